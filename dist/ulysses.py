"""DeepSpeed-Ulysses: context-parallel attention by all-to-all between sequence and head sharding.

Paper: Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme
Long Sequence Transformer Models" (2023).

Math. Attention heads are independent, so P ranks that each hold N/P tokens of all H heads can
trade them for all N tokens of about H/P heads with one all-to-all, run ordinary exact attention
over the full sequence locally, and trade back:

    q_r (b, N/P, H, d) --all-to-all--> q^(r) (b, N, H_r, d)      (heads of rank r, all tokens)
    o^(r) = softmax(scale · q^(r) k^(r)ᵀ [+ causal mask]) v^(r)
    o^(r) (b, N, H_r, d) --all-to-all--> o_r (b, N/P, H, d)

Each all-to-all sends (P−1)/P of the tensor it moves and receives as much: per rank and
forward pass (P−1)/P · (|q_r| + |k_r| + |v_r| + |o_r|) bytes; the backward pass moves do the
same way and returns dq, dk, dv (another (P−1)/P · (|o_r| + |q_r| + |k_r| + |v_r|)).

Data layout. q/k/v are this rank's shard (`batch, N/P, heads, head_dim`) in `layout`
(`contiguous`, `zigzag` or `stripe`, see `dist/layout.py`); the output is this rank's shard in
the same layout. After the all-to-all a rank holds the rank-major concatenation of all shards;
for causal attention with zigzag/stripe it is permuted into global token order before the local
attention and back after it (non-causal attention does not depend on token order).

Heads. Query heads are split over ranks in contiguous ranges as evenly as possible (the first
H mod P ranks get one more; uneven splits use the split-size all-to-all). Grouped-query
attention: each rank receives only the key/value heads its query heads read. When the kv heads
divide evenly (H_kv % P == 0 and H % P == 0) that is a partition (no copies); when there are
fewer kv heads than ranks, a kv head is sent to every rank whose queries read it (the fewest
copies possible), and the backward pass sums the gradients of the copies at their owner.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from ctxscale.dist import comm
from ctxscale.dist.layout import LAYOUTS, check_divisible, global_positions
from ctxscale.kernels import attention


# ---------------------------------------------------------------- head plan
def query_head_ranges(num_heads: int, world_size: int) -> list[range]:
    """Contiguous query-head ranges per rank, sizes differing by at most one."""
    if num_heads < world_size:
        raise ValueError(
            f"Ulysses attention shards heads: {num_heads} query heads cannot be split over "
            f"{world_size} ranks (each rank needs at least one head). Use a Ulysses degree of at "
            f"most {num_heads} (method='usp' with ulysses_degree dividing the context-parallel "
            "size), or method='ring'/'lightseq', which do not shard heads"
        )
    base, extra = divmod(num_heads, world_size)
    ranges, start = [], 0
    for r in range(world_size):
        size = base + (1 if r < extra else 0)
        ranges.append(range(start, start + size))
        start += size
    return ranges


def kv_heads_for(q_heads: range, group_size: int) -> list[int]:
    """The fewest kv heads (a list, order = local kv head order) that let local grouped-query
    attention over `q_heads` read the right global kv head: local q head i reads local kv head
    i // (len(q_heads) / len(result)), and global q head h reads global kv head h // group_size."""
    count = len(q_heads)
    for local_kv in range(1, count + 1):
        if count % local_kv:
            continue
        local_group = count // local_kv
        heads = [(q_heads[m * local_group]) // group_size for m in range(local_kv)]
        if all(h // group_size == heads[i // local_group] for i, h in enumerate(q_heads)):
            return heads
    raise AssertionError("unreachable: one kv head per query head always works")


def head_plan(num_heads: int, num_kv_heads: int, world_size: int):
    """(query head ranges, kv head lists) per rank for a Ulysses all-to-all."""
    if num_heads % num_kv_heads:
        raise ValueError(
            f"{num_heads} query heads and {num_kv_heads} key/value heads: the number of query "
            "heads must be a multiple of the number of key/value heads (grouped-query attention)"
        )
    q_ranges = query_head_ranges(num_heads, world_size)
    group_size = num_heads // num_kv_heads
    return q_ranges, [kv_heads_for(r, group_size) for r in q_ranges]


# ---------------------------------------------------------------- all-to-all between shardings
def _world(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _all_to_all(pieces: list[torch.Tensor], recv_shapes: list[tuple], group) -> list[torch.Tensor]:
    """Send pieces[j] to rank j; return what each rank sent here, shaped `recv_shapes[r]`."""
    send = torch.cat([p.reshape(-1) for p in pieces])
    in_splits = [p.numel() for p in pieces]
    out_splits = [math.prod(s) for s in recv_shapes]
    out = send.new_empty(sum(out_splits))
    if len(set(in_splits)) == 1 and len(set(out_splits)) == 1:
        comm.all_to_all_single(out, send, group=group)
    else:
        comm.all_to_all_single(
            out, send, group=group, output_split_sizes=out_splits, input_split_sizes=in_splits
        )
    return [o.view(s) for o, s in zip(out.split(out_splits), recv_shapes)]


def _index(heads) -> torch.Tensor:
    return torch.as_tensor(list(heads), dtype=torch.long)


def _seq_to_heads(tensors, head_lists, group):
    """Each x (b, n, H_x, d) sharded by sequence -> (b, P·n, len(head_lists[x][rank]), d): the
    rank-major concatenation of every rank's shard, restricted to this rank's heads. One
    all-to-all for all tensors."""
    rank, world = _world(group)
    pieces, slices = [], []
    for j in range(world):
        parts = [x.index_select(2, _index(h[j]).to(x.device)) for x, h in zip(tensors, head_lists)]
        pieces.append(torch.cat([p.reshape(-1) for p in parts]))
    for x, h in zip(tensors, head_lists):
        b, n, _, d = x.shape
        slices.append((b, n, len(h[rank]), d))
    per_rank = sum(math.prod(s) for s in slices)
    received = _all_to_all(pieces, [(per_rank,)] * world, group)
    outs = []
    offset = 0
    for s in slices:
        size = math.prod(s)
        outs.append(torch.cat([r[offset : offset + size].view(s) for r in received], dim=1))
        offset += size
    return outs


def _heads_to_seq(tensors, head_lists, num_heads, group):
    """Inverse direction: each y (b, P·n, len(head_lists[y][rank]), d) -> (b, n, H_y, d), summing
    the copies of a head that several ranks held (index_add)."""
    rank, world = _world(group)
    pieces = []
    for j in range(world):
        parts = [y.chunk(world, dim=1)[j] for y in tensors]
        pieces.append(torch.cat([p.reshape(-1) for p in parts]))
    shapes = []
    for j in range(world):
        shapes.append((sum(y.shape[0] * (y.shape[1] // world) * len(h[j]) * y.shape[3]
                           for y, h in zip(tensors, head_lists)),))
    received = _all_to_all(pieces, shapes, group)
    outs = []
    for i, (y, h, heads) in enumerate(zip(tensors, head_lists, num_heads)):
        b, n, d = y.shape[0], y.shape[1] // world, y.shape[3]
        out = y.new_zeros(b, n, heads, d)
        for j in range(world):
            offset = sum(b * n * len(hh[j]) * d for hh in head_lists[:i])
            size = b * n * len(h[j]) * d
            block = received[j][offset : offset + size].view(b, n, len(h[j]), d)
            out.index_add_(2, _index(h[j]).to(out.device), block)
        outs.append(out)
    return outs


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, head_lists, num_heads, *tensors):
        ctx.group, ctx.head_lists, ctx.num_heads = group, head_lists, num_heads
        return tuple(_seq_to_heads(tensors, head_lists, group))

    @staticmethod
    def backward(ctx, *grads):
        grads = [g.contiguous() for g in grads]
        return (None, None, None, *_heads_to_seq(grads, ctx.head_lists, ctx.num_heads, ctx.group))


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, head_lists, num_heads, *tensors):
        ctx.group, ctx.head_lists, ctx.num_heads = group, head_lists, num_heads
        return tuple(_heads_to_seq(tensors, head_lists, num_heads, group))

    @staticmethod
    def backward(ctx, *grads):
        grads = [g.contiguous() for g in grads]
        return (None, None, None, *_seq_to_heads(grads, ctx.head_lists, ctx.group))


def seq_to_heads(tensors, head_lists, *, group=None):
    """Differentiable: sequence-sharded (b, n, H, d) tensors -> head-sharded (b, P·n, H_r, d)
    (rank-major token order). `head_lists[i][r]`: heads of tensor i that rank r receives."""
    num_heads = [t.shape[2] for t in tensors]
    return _SeqToHeads.apply(group, head_lists, num_heads, *tensors)


def heads_to_seq(tensors, head_lists, num_heads, *, group=None):
    """Differentiable inverse of `seq_to_heads` for head lists that partition the heads."""
    return _HeadsToSeq.apply(group, head_lists, num_heads, *tensors)


# ---------------------------------------------------------------- layout order
def layout_order(seq_len: int, ranks: list[int], world_size: int, layout: str, device=None):
    """Global token index of each position of the rank-major concatenation of `ranks`' shards."""
    return torch.cat([global_positions(seq_len, r, world_size, layout, device) for r in ranks])


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


# ---------------------------------------------------------------- attention
def _check_inputs(q, k, v, layout):
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; choose one of {LAYOUTS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "context-parallel attention expects (batch, seq_local, heads, head_dim) tensors; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[1] != k.shape[1] or k.shape != v.shape:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: the local shards must "
            "have the same length, and k and v the same shape"
        )


def ulysses_attention(q, k, v, *, group=None, layout="contiguous", causal=True, softmax_scale=None,
                      segments=None):
    """DeepSpeed-Ulysses attention over the ranks of `group` (see the module docstring).

    q: (batch, N/P, heads, head_dim), k/v: (batch, N/P, kv_heads, head_dim), this rank's shard
    in `layout`. Returns o: (batch, N/P, heads, head_dim), this rank's shard in `layout`.
    Differentiable (the backward pass runs the all-to-alls in reverse). `segments`: the global
    `(batch, N)` document ids (document masking), the same on every rank.
    """
    from ctxscale.dist.ring import check_global_segments
    from ctxscale.kernels.attention_tiles import _segment_kwargs

    _check_inputs(q, k, v, layout)
    rank, world = _world(group)
    check_global_segments(segments, q, world, "ulysses_attention")
    seg_kw = _segment_kwargs(segments, segments)
    if world == 1:
        return attention(q, k, v, causal=causal, softmax_scale=softmax_scale, **seg_kw)
    seq_len = q.shape[1] * world
    check_divisible(seq_len, world, layout)
    q_ranges, kv_lists = head_plan(q.shape[2], k.shape[2], world)
    q_lists = [list(r) for r in q_ranges]
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale

    q_h, k_h, v_h = seq_to_heads([q, k, v], [q_lists, kv_lists, kv_lists], group=group)
    # rank-major layout order -> global order, so the causal mask is the plain one (and the
    # document ids are the global ones)
    reorder = (causal or segments is not None) and layout != "contiguous"
    if reorder:
        order = layout_order(seq_len, list(range(world)), world, layout, q.device)
        to_global = inverse_permutation(order)
        q_h, k_h, v_h = (t.index_select(1, to_global) for t in (q_h, k_h, v_h))
    o_h = attention(q_h, k_h, v_h, causal=causal, softmax_scale=scale, **seg_kw)
    if reorder:
        o_h = o_h.index_select(1, order)
    (o,) = heads_to_seq([o_h], [q_lists], [q.shape[2]], group=group)
    return o
