"""The parallel context a model receives: what a layer needs to know about parallelism.

A model never calls `torch.distributed` itself. It asks its `ParallelContext` for attention over
the (possibly sharded) sequence and for the global positions of its tokens. With `cp_size == 1`
this is plain `ctxscale.kernels.attention`; otherwise `context_parallel_attention` with the
configured method and layout over `cp_group`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ctxscale.dist.layout import global_positions


@dataclass
class ParallelContext:
    cp_group: object = None
    cp_size: int = 1
    cp_rank: int = 0
    cp_method: str = "ring"
    cp_layout: str = "contiguous"
    ulysses_degree: int | None = None
    # State passing between shards for recurrent layers (dist/recurrent.py): allgather | ring.
    cp_state_method: str = "allgather"

    @property
    def cp_enabled(self) -> bool:
        return self.cp_size > 1

    def attention(self, q, k, v, *, causal=True, softmax_scale=None):
        """Exact attention of this rank's queries over the whole sequence.
        q/k/v: `(batch, seq_local, heads, head_dim)` in `cp_layout`."""
        if not self.cp_enabled:
            from ctxscale.kernels import attention

            return attention(q, k, v, causal=causal, softmax_scale=softmax_scale)
        from ctxscale.dist.context_parallel import context_parallel_attention

        return context_parallel_attention(
            q, k, v, group=self.cp_group, method=self.cp_method, layout=self.cp_layout,
            causal=causal, softmax_scale=softmax_scale, ulysses_degree=self.ulysses_degree,
        )

    # ------------------------------------------------------------ recurrent layers
    def _recurrent_cp(self, op: str):
        """The dist/recurrent.py module when context parallel, after checking the layout."""
        if self.cp_layout != "contiguous":
            raise ValueError(
                f"{op} under context parallelism passes a state from rank to rank, so it needs "
                f"parallel.cp_layout=contiguous (got {self.cp_layout!r}); set "
                "parallel.cp_layout=contiguous for models with recurrent layers"
            )
        from ctxscale.dist import recurrent

        return recurrent

    def linear_attention(self, q, k, v, *, log_decay=None, scale=None):
        """Causal linear attention (simple-GLA semantics, `ctxscale.kernels.linear_attention`)
        over the whole sequence; q, k `(batch, seq_local, heads, dim_k)`, v `(..., dim_v)`,
        log_decay `(batch, seq_local, heads)`, `(heads,)` or None."""
        if not self.cp_enabled:
            from ctxscale.kernels.linear_attention import linear_attention

            return linear_attention(q, k, v, log_decay=log_decay, scale=scale)
        return self._recurrent_cp("linear attention").cp_linear_attention(
            q, k, v, log_decay=log_decay, scale=scale, group=self.cp_group,
            method=self.cp_state_method,
        )

    def selective_scan(self, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False):
        """Mamba's selective scan (mamba-ssm `selective_scan_fn` arguments, sequence last)."""
        if not self.cp_enabled:
            from ctxscale.kernels.selective_scan import selective_scan

            return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus)
        return self._recurrent_cp("the selective scan").cp_selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, group=self.cp_group,
            method=self.cp_state_method,
        )

    def causal_conv1d(self, x, weight, bias=None, *, activation=None):
        """Causal depthwise conv over the sequence; x `(batch, dim, seq_local)`."""
        if not self.cp_enabled:
            from ctxscale.kernels.conv1d import causal_conv1d

            return causal_conv1d(x, weight, bias, activation=activation)
        return self._recurrent_cp("the causal conv1d").cp_causal_conv1d(
            x, weight, bias, activation=activation, group=self.cp_group
        )

    def position_ids(self, batch: int, seq_local: int, device=None) -> torch.Tensor:
        """Global positions `(batch, seq_local)` of this rank's tokens."""
        pos = global_positions(seq_local * self.cp_size, self.cp_rank, self.cp_size,
                               self.cp_layout, device=device)
        return pos.unsqueeze(0).expand(batch, -1)


SINGLE = ParallelContext()
