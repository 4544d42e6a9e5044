"""Sequence layouts for context parallelism: which global tokens each rank holds.

With P ranks and a global sequence of N tokens:
- `contiguous`: rank r holds tokens [r·N/P, (r+1)·N/P). N must be a multiple of P.
- `zigzag`: the sequence is cut into 2P equal chunks and rank r holds chunks r and 2P−1−r, so
  every rank has the same causal work. N must be a multiple of 2P.
- `stripe`: token i lives on rank i mod P (local order = global order). N must be a multiple of P.

`global_positions(N, rank, P, layout)` gives the global index of each local token; RoPE, masks
and labels use it, so every layout computes the same function as one process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.weak import WeakIdKeyDictionary

LAYOUTS = ("contiguous", "zigzag", "stripe")


def required_multiple(world_size: int, layout: str) -> int:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; choose one of {LAYOUTS}")
    return 2 * world_size if layout == "zigzag" else world_size


def check_divisible(seq_len: int, world_size: int, layout: str) -> None:
    multiple = required_multiple(world_size, layout)
    if seq_len % multiple != 0:
        raise ValueError(
            f"sequence length {seq_len} cannot be split over {world_size} context-parallel ranks "
            f"with layout {layout!r}: it must be a multiple of {multiple} "
            f"(nearest valid lengths: {seq_len // multiple * multiple or multiple} or "
            f"{(seq_len // multiple + 1) * multiple})"
        )


def global_positions(seq_len: int, rank: int, world_size: int, layout: str, device=None):
    """Global token indices held by `rank`, in local order (a LongTensor of N/P entries)."""
    check_divisible(seq_len, world_size, layout)
    if layout == "contiguous":
        n = seq_len // world_size
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    if layout == "stripe":
        return torch.arange(rank, seq_len, world_size, device=device)
    c = seq_len // (2 * world_size)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    j = 2 * world_size - 1 - rank
    return torch.cat([first, torch.arange(j * c, (j + 1) * c, device=device)])


class ShardSegments:
    """Document ids of every rank's shard, from the global `(batch, N)` ids that all ranks of
    a context-parallel group hold (document masking: each rank's queries and each incoming
    key block need their tokens' ids). `shard(r)` is rank r's `(batch, N/P)` in local order;
    `disjoint(r, s)` is True when no token of shard r shares a document with shard s, so a
    block between them can be skipped (its id ranges do not meet; one host sync per call of
    the constructor). Use `ShardSegments.of`, which makes one per ids tensor."""

    def __init__(self, segments: torch.Tensor, world_size: int, layout: str):
        n = segments.shape[1]
        self.shards = [segments[:, global_positions(n, r, world_size, layout, device=segments.device)]
                       for r in range(world_size)]
        ranges = torch.stack([torch.stack([s.min(), s.max()]) for s in self.shards]).tolist()
        self.ranges = [tuple(r) for r in ranges]

    @classmethod
    def of(cls, segments: torch.Tensor, world_size: int, layout: str) -> ShardSegments:
        """The instance for these ids, made once while the tensor is unchanged: every attention
        layer of a forward (and its recompute under activation checkpointing) receives the same
        ids tensor, so the ranges reach the host once per step, not once per layer (on a GPU
        each such read waits for the queued work, and the host stops running ahead)."""
        try:
            version = segments._version  # bumped by in-place writes (a reused ids buffer)
        except RuntimeError:  # inference tensors keep no version counter: nothing to check
            return cls(segments, world_size, layout)
        made = _SHARDS.setdefault(segments, {})
        key = (world_size, layout)
        if key not in made or made[key][0] != version:
            made[key] = (version, cls(segments, world_size, layout))
        return made[key][1]

    def shard(self, rank: int) -> torch.Tensor:
        return self.shards[rank]

    def disjoint(self, r: int, s: int) -> bool:
        (a0, a1), (b0, b1) = self.ranges[r], self.ranges[s]
        return a1 < b0 or b1 < a0


# ids tensor -> {(world size, layout): (its version then, ShardSegments)}; an entry goes with its
# tensor (the shards are copies and hold no reference to it)
_SHARDS = WeakIdKeyDictionary()


def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(x: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1):
    """This rank's shard of the global sequence `x` along `dim`, in `layout` (no communication)."""
    rank, world = _world(group)
    idx = global_positions(x.shape[dim], rank, world, layout, device=x.device)
    if layout == "contiguous":
        n = x.shape[dim] // world
        return x.narrow(dim, rank * n, n)
    return x.index_select(dim, idx)


def gather_sequence(x_local: torch.Tensor, *, group=None, layout: str = "contiguous", dim: int = 1):
    """The global sequence from every rank's shard (all-gather; differentiable: the backward pass
    returns this rank's shard of the gradient, summed over ranks)."""
    rank, world = _world(group)
    if world == 1:
        return x_local
    return _GatherSequence.apply(x_local, group, layout, dim)


def _order(seq_len: int, world: int, layout: str, device) -> torch.Tensor:
    """Global index of each position of the rank-major concatenation of all shards."""
    return torch.cat([global_positions(seq_len, r, world, layout, device) for r in range(world)])


class _GatherSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, layout, dim):
        from ctxscale.dist import comm

        world = dist.get_world_size(group)
        ctx.group, ctx.layout, ctx.dim = group, layout, dim
        moved = x_local.movedim(dim, 0).contiguous()
        out = torch.empty((world * moved.shape[0],) + moved.shape[1:], dtype=moved.dtype,
                          device=moved.device)
        comm.all_gather_into_tensor(out, moved, group=group)
        n = out.shape[0]
        inverse = torch.empty(n, dtype=torch.long, device=out.device)
        inverse[_order(n, world, layout, out.device)] = torch.arange(n, device=out.device)
        return out.index_select(0, inverse).movedim(0, dim)

    @staticmethod
    def backward(ctx, grad):
        from ctxscale.dist import comm

        grad = grad.contiguous()
        comm.all_reduce(grad, group=ctx.group)
        return shard_sequence(grad, group=ctx.group, layout=ctx.layout, dim=ctx.dim), None, None, None
