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

    def position_ids(self, batch: int, seq_local: int, device=None) -> torch.Tensor:
        """Global positions `(batch, seq_local)` of this rank's tokens."""
        pos = global_positions(seq_local * self.cp_size, self.cp_rank, self.cp_size,
                               self.cp_layout, device=device)
        return pos.unsqueeze(0).expand(batch, -1)


SINGLE = ParallelContext()
