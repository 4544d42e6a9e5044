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
from ctxscale.kernels.dispatch import eager


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

    @eager  # the kernels and the context-parallel exchanges run outside torch.compile
    def attention(self, q, k, v, *, causal=True, softmax_scale=None, document_ids=None):
        """Exact attention of this rank's queries over the whole sequence.
        q/k/v: `(batch, seq_local, heads, head_dim)` in `cp_layout`. `document_ids`: the
        `(batch, seq)` document id of every token of the WHOLE sequence (the same on every cp
        rank): a query sees only keys of its own document (packed sequences)."""
        if not self.cp_enabled:
            from ctxscale.kernels import attention

            from ctxscale.kernels.attention_tiles import _segment_kwargs

            return attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                             **_segment_kwargs(document_ids, document_ids))
        from ctxscale.dist.context_parallel import context_parallel_attention

        return context_parallel_attention(
            q, k, v, group=self.cp_group, method=self.cp_method, layout=self.cp_layout,
            causal=causal, softmax_scale=softmax_scale, ulysses_degree=self.ulysses_degree,
            segments=document_ids,
        )

    def cross_entropy(self, hidden, weight, labels, *, reduction="sum"):
        """Summed (or mean) cross-entropy of `hidden (batch, seq, dim) @ weightᵀ` against
        `labels (batch, seq)`, without materializing the logits. A tensor-parallel output weight
        (a DTensor sharded on the vocabulary) takes the vocabulary-parallel path."""
        from ctxscale.dist.tensor_parallel import is_vocab_sharded

        if is_vocab_sharded(weight):
            from ctxscale.dist.tensor_parallel import vocab_parallel_cross_entropy

            return vocab_parallel_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(),
                                                reduction=reduction)
        from ctxscale.kernels.cross_entropy import chunked_cross_entropy

        return chunked_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(),
                                     reduction=reduction)

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

    # `document_ids` of the recurrent ops: None, or the `(batch, seq)` document ids of the WHOLE
    # sequence (the same on every cp rank, as for `attention`): the recurrence restarts at every
    # document start (kernels/recurrent_segments.py)
    @eager
    def linear_attention(self, q, k, v, *, log_decay=None, scale=None, document_ids=None):
        """Causal linear attention (simple-GLA semantics, `ctxscale.kernels.linear_attention`)
        over the whole sequence; q, k `(batch, seq_local, heads, dim_k)`, v `(..., dim_v)`,
        log_decay `(batch, seq_local, heads)`, `(heads,)` or None."""
        if not self.cp_enabled:
            from ctxscale.kernels.linear_attention import linear_attention

            return linear_attention(q, k, v, log_decay=log_decay, scale=scale,
                                    segments=document_ids)
        return self._recurrent_cp("linear attention").cp_linear_attention(
            q, k, v, log_decay=log_decay, scale=scale, group=self.cp_group,
            method=self.cp_state_method, segments=document_ids,
        )

    @eager
    def selective_scan(self, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                       delta_softplus=False, *, document_ids=None):
        """Mamba's selective scan (mamba-ssm `selective_scan_fn` arguments, sequence last)."""
        if not self.cp_enabled:
            from ctxscale.kernels.selective_scan import selective_scan

            return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                  segments=document_ids)
        return self._recurrent_cp("the selective scan").cp_selective_scan(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, group=self.cp_group,
            method=self.cp_state_method, segments=document_ids,
        )

    @eager
    def causal_conv1d(self, x, weight, bias=None, *, activation=None, document_ids=None):
        """Causal depthwise conv over the sequence; x `(batch, dim, seq_local)`."""
        if not self.cp_enabled:
            from ctxscale.kernels.conv1d import causal_conv1d

            return causal_conv1d(x, weight, bias, activation=activation, segments=document_ids)
        # contiguous: the halo exchange receives into a zeros_like of the input's tail, and
        # gloo refuses non-contiguous buffers (a transposed projection output is one)
        return self._recurrent_cp("the causal conv1d").cp_causal_conv1d(
            x.contiguous(), weight, bias, activation=activation, group=self.cp_group,
            segments=document_ids,
        )

    def position_ids(self, batch: int, seq_local: int, device=None) -> torch.Tensor:
        """Global positions `(batch, seq_local)` of this rank's tokens."""
        pos = global_positions(seq_local * self.cp_size, self.cp_rank, self.cp_size,
                               self.cp_layout, device=device)
        return pos.unsqueeze(0).expand(batch, -1)

    # ------------------------------------------------ recurrent-state passing (Titans memory)
    def recv_state(self, state: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's initial recurrent state: `state` on cp rank 0 (or without cp), else the
        previous cp rank's final state (see dist/titans_cp.py). Pair with `send_state`."""
        if not self.cp_enabled:
            return list(state)
        self._require_contiguous("state passing")
        from ctxscale.dist.titans_cp import recv_state

        return recv_state(state, group=self.cp_group)

    def send_state(self, y: torch.Tensor, state: list[torch.Tensor]) -> torch.Tensor:
        """Send this rank's final recurrent state to the next cp rank; returns `y` unchanged
        (it carries the backward exchange, so use the returned tensor)."""
        if not self.cp_enabled:
            return y
        from ctxscale.dist.titans_cp import send_state

        return send_state(y, state, group=self.cp_group)

    def with_halo(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """`x` `(batch, seq_local, ...)` with the previous cp rank's last `n` tokens prepended
        (unchanged on cp rank 0 and without cp): the keys a sliding window needs."""
        if not self.cp_enabled or n == 0:
            return x
        self._require_contiguous("the sliding-window halo exchange")
        from ctxscale.dist.titans_cp import with_halo

        return with_halo(x, n, group=self.cp_group)

    def _require_contiguous(self, what: str) -> None:
        if self.cp_layout != "contiguous":
            raise ValueError(
                f"{what} needs parallel.cp_layout=contiguous (got {self.cp_layout!r}): each "
                "rank must hold one contiguous piece of the sequence"
            )


SINGLE = ParallelContext()
