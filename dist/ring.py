"""Ring attention: exact softmax attention over a sequence sharded across a ring of ranks.

Papers: Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite
Context" (2023); the online softmax of Milakov & Gimelshein (2018) and FlashAttention-2 (Dao,
2023); load-balanced causal layouts as in Brandon et al., "Striped Attention" (2023) and the
zigzag schedule of ring-flash-attention / Llama 3 context parallelism.

Math. Rank r holds queries Q_r and, at ring step t = 0..P-1, the keys/values K_s, V_s of source
rank s = (r - t) mod P (K/V move one hop to rank r+1 per step). Each step computes one block
(o_s, lse_s) = attention(Q_r, K_s, V_s) and merges it into the running result in float32 with
log-sum-exp (`attention_forward_merge`: inside the flash kernel on Triton, in place):

    lse = log(exp(lse) + exp(lse_s)),   o = o·exp(lse_old − lse) + o_s·exp(lse_s − lse)

so after P steps (o, lse) is exact softmax attention of Q_r against the whole sequence. The
backward pass runs the same ring: every block's (dq, dk, dv) comes from `attention_backward_into`
(which adds dq, and at step 0 the own dK/dV, into the running sums inside the kernel) with the
GLOBAL o and lse (the softmax of a block uses the global normalizer), dq accumulates locally,
and the dK/dV contributions for source s travel with an accumulator that reaches rank s after
P−1 hops (float32).

Causal masking uses global token positions (see `ctxscale.dist.layout`; local length n = N/P):
- contiguous: s == r is the causal diagonal block, s < r fully visible, s > r skipped (rank r
  does r+1 blocks: unbalanced, max/mean work → (2P−1)/P).
- zigzag: rank r holds chunks r and 2P−1−r of size c = n/2. s == r: local causal (local order
  is ascending). s < r: chunk s precedes both query chunks and chunk 2P−1−s follows both, so
  all n queries attend the first half of the incoming K/V, unmasked. s > r: both incoming
  chunks lie after chunk r and before chunk 2P−1−r, so only the second half of the queries
  attends, to all n keys, unmasked. Every rank does the same work.
- stripe: token i on rank i mod P, so local q_i has position i·P + r and k_j of source s has
  j·P + s. Visible iff j·P + s ≤ i·P + r: for s ≤ r that is j ≤ i (inclusive causal), for
  s > r it is j < i (strictly causal), computed with the inclusive bottom-right kernel on
  q[1:] against k[:-1] (row 0 sees nothing).
Without a causal mask every block is fully visible and the layout does not matter.

Document masking (`segments`, the global `(batch, N)` document ids every rank holds): each block
passes its query rows' and key rows' ids to the kernel, which masks across documents and skips
tiles that share none; a whole block whose shards share no document is skipped (K/V still
travel, so the schedule and the bytes do not change).

Communication overlap: K/V live in two buffers; the hop that brings the NEXT step's K/V is posted
before the current block computes and waited on only after it (`overlap=False`: post, wait, then
compute — the synchronous schedule the overlap benchmark compares against).

Shapes: q `(batch, seq_local, heads, head_dim)`, k/v `(batch, seq_local, kv_heads, head_dim)`
with `heads % kv_heads == 0` (grouped-query attention; k/v are never repeated before sending).
Returns this rank's output shard `(batch, seq_local, heads, head_dim)` in q's dtype.

Bytes per rank, each way (n = N/P, e = element size of k/v):
    forward   2·(P−1)·b·n·h_kv·d·e                       (K and V, P−1 hops)
    backward  2·(P−1)·b·n·h_kv·d·e + 2·(P−1)·b·n·h_kv·d·4  (K/V again, plus float32 dK/dV)
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ctxscale.dist import comm
from ctxscale.dist.layout import LAYOUTS, ShardSegments, check_divisible
from ctxscale.kernels.attention import (
    attention_backward_into,
    attention_flops,
    attention_forward_merge,
)


def group_rank_world(group) -> tuple[int, int]:
    """(rank within `group`, group size); (0, 1) when torch.distributed is not initialized."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def check_cp_inputs(q, k, v, *, world: int, layout: str, name: str) -> None:
    """ValueErrors for shapes or layouts a context-parallel attention cannot run."""
    if layout not in LAYOUTS:
        raise ValueError(f"{name}: unknown layout {layout!r}; choose one of {LAYOUTS}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"{name} expects (batch, seq_local, heads, head_dim) tensors; got q "
            f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(
            f"{name}: q, k and v must hold the same local sequence shard; got local lengths "
            f"{q.shape[1]}, {k.shape[1]}, {v.shape[1]}"
        )
    if k.shape != v.shape:
        raise ValueError(f"{name}: k {tuple(k.shape)} and v {tuple(v.shape)} must have equal shapes")
    check_divisible(q.shape[1] * world, world, layout)


def check_global_segments(segments, q, world: int, name: str) -> None:
    """ValueError unless `segments` is None or the global `(batch, seq_local · world)` ids."""
    if segments is None:
        return
    want = (q.shape[0], q.shape[1] * world)
    if segments.shape != want or segments.dtype not in (torch.int32, torch.int64):
        raise ValueError(
            f"{name}: segments must be the int32/int64 integer document ids of the whole sequence, shape "
            f"(batch, seq_local * cp) = {want}, the same on every rank; got {segments.dtype} "
            f"{tuple(segments.shape)}"
        )


def block_plan(layout: str, causal: bool, rank: int, src: int, n: int):
    """The one block rank `rank` computes against source `src`'s K/V (local length n):
    `(query rows, key rows, causal)` as slices, or None when the mask hides all of it."""
    full = slice(0, n)
    if not causal:
        return full, full, False
    if src == rank:
        return full, full, True
    if layout == "contiguous":
        return (full, full, False) if src < rank else None
    if layout == "zigzag":
        half = n // 2
        return (full, slice(0, half), False) if src < rank else (slice(half, n), full, False)
    if layout == "stripe":
        if src < rank:
            return full, full, True
        return (slice(1, n), slice(0, n - 1), True) if n > 1 else None
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def _rows(x: torch.Tensor, rows: slice) -> torch.Tensor:
    return x[:, rows]


class RotatingBuffer:
    """A tensor that moves one hop round the ring per step (double-buffered).

    At step t the buffer holds source rank (rank − t)'s tensor. `begin(t)` returns it; with
    `overlap` it first posts the hop that brings step t+1's tensor, and `end(t)` waits on that
    hop after the caller has computed. Without overlap `begin` posts and waits on step t's hop.
    """

    def __init__(self, x, *, group, rank, world, overlap, tag, kind="p2p", owned=False):
        # from P = 3 on, step 2 receives into the first buffer: it must not be the caller's
        # tensor unless `owned` says the caller handed over a private copy
        if world > 2 and not owned:
            x = x.clone(memory_format=torch.contiguous_format)
        x = x.contiguous()
        self.bufs = [x, torch.empty(x.shape, dtype=x.dtype, device=x.device) if world > 1 else None]
        self.group, self.world, self.overlap, self.tag, self.kind = group, world, overlap, tag, kind
        self.dst, self.src = (rank + 1) % world, (rank - 1) % world
        self.handle = None

    def _hop(self, send, recv, step):
        return comm.exchange([(send, self.dst)], [(recv, self.src)], group=self.group,
                             tag=f"{self.tag}{step}", kind=self.kind)

    def begin(self, step: int) -> torch.Tensor:
        cur = self.bufs[step % 2]
        if self.overlap:
            if step < self.world - 1:
                self.handle = self._hop(cur, self.bufs[(step + 1) % 2], step + 1)
        elif step > 0:
            self._hop(self.bufs[(step - 1) % 2], cur, step).wait()
        return cur

    def end(self, step: int) -> None:
        if self.overlap and step < self.world - 1:
            self.handle.wait()


class TravellingSum:
    """Sums every rank's contribution for source rank s onto rank s, round the ring.

    At step t >= 1 rank r adds its contribution for source r − t to the accumulator that came
    from rank r − 1 (a fresh zero one at t = 1) and sends it to rank r + 1; after step P − 1 the
    accumulator reaches its owner, which adds its own (step 0) part. P − 1 hops per rank. The hop
    posted at step t is waited on at step t + 1 after that step's compute (overlap) or at once.
    """

    def __init__(self, like, *, group, rank, world, overlap, tag, kind="p2p"):
        self.bufs = [torch.empty(like.shape, dtype=like.dtype, device=like.device)
                     for _ in range(2 if world > 1 else 0)]
        self.group, self.world, self.overlap, self.tag, self.kind = group, world, overlap, tag, kind
        self.dst, self.src = (rank + 1) % world, (rank - 1) % world
        self.handle = None

    def accumulator(self, step: int) -> torch.Tensor:
        """The accumulator for step t >= 1 (waits for it to arrive); add into it, then `send`."""
        acc = self.bufs[step % 2]
        if step == 1:
            acc.zero_()
        else:
            self.handle.wait()
        return acc

    def send(self, step: int) -> None:
        acc, nxt = self.bufs[step % 2], self.bufs[(step + 1) % 2]
        self.handle = comm.exchange([(acc, self.dst)], [(nxt, self.src)], group=self.group,
                                    tag=f"{self.tag}{step}", kind=self.kind)
        if not self.overlap:
            self.handle.wait()

    def result(self):
        """The sum of the other ranks' contributions for this rank (None when P = 1)."""
        if self.world == 1:
            return None
        self.handle.wait()
        return self.bufs[self.world % 2]


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _len(rows: slice, n: int) -> int:
    return len(range(n)[rows])


def _block_flops(b, h, d, q_rows, k_rows, causal) -> float:
    """Forward matmul FLOPs of one block: 4·b·h·d per visible score (causal blocks here are
    square, so `attention_flops` counts exactly the visible n(n+1)/2 scores)."""
    return attention_flops(b, q_rows, k_rows, h, d, causal)


def _block_segments(segs, rank, src, rows, krows):
    """Kernel kwargs for one block: its query and key rows' document ids (none without)."""
    if segs is None:
        return {}
    return {"q_segments": segs.shard(rank)[:, rows], "k_segments": segs.shard(src)[:, krows]}


def _plan(layout, causal, rank, src, n, segs):
    """`block_plan`, or None also when the two shards share no document."""
    if segs is not None and segs.disjoint(rank, src):
        return None
    return block_plan(layout, causal, rank, src, n)


def _ring_forward(q, k, v, *, group, layout, causal, scale, overlap, segs=None):
    rank, world = group_rank_world(group)
    b, n, h, d = q.shape
    cdt = _compute_dtype(q.dtype)
    out = torch.zeros(b, n, h, v.shape[-1], dtype=cdt, device=q.device)
    lse = torch.full((b, h, n), float("-inf"), dtype=cdt, device=q.device)
    kv = RotatingBuffer(torch.stack([k, v]), group=group, rank=rank, world=world,
                        overlap=overlap, tag="ring_fwd_kv", owned=True)
    for step in range(world):
        src = (rank - step) % world
        kv_s = kv.begin(step)
        plan = _plan(layout, causal, rank, src, n, segs)
        if plan is not None:
            rows, krows, blk_causal = plan
            qb = _rows(q, rows)
            comm.trace("compute", f"ring_fwd{step}")
            # merged into the running (out, lse) rows in place: inside the kernel on Triton
            attention_forward_merge(qb, kv_s[0][:, krows], kv_s[1][:, krows], out[:, rows],
                                    lse[:, :, rows], causal=blk_causal, softmax_scale=scale,
                                    **_block_segments(segs, rank, src, rows, krows))
            comm.record_attention_work(
                blocks=1, flops=_block_flops(b, h, d, _len(rows, n), _len(krows, n), blk_causal)
            )
        kv.end(step)
    return out, lse


def _ring_backward(do, q, k, v, out, lse, *, group, layout, causal, scale, overlap, segs=None):
    rank, world = group_rank_world(group)
    b, n, h, d = q.shape
    cdt = _compute_dtype(q.dtype)
    dq = torch.zeros(b, n, h, d, dtype=cdt, device=q.device)
    dkv_own = torch.zeros((2,) + k.shape, dtype=cdt, device=q.device)
    kv = RotatingBuffer(torch.stack([k, v]), group=group, rank=rank, world=world,
                        overlap=overlap, tag="ring_bwd_kv", owned=True)
    dkv = TravellingSum(dkv_own, group=group, rank=rank, world=world, overlap=overlap,
                        tag="ring_bwd_dkv")
    for step in range(world):
        src = (rank - step) % world
        kv_s = kv.begin(step)
        plan = _plan(layout, causal, rank, src, n, segs)
        grads = None
        if plan is not None:
            rows, krows, blk_causal = plan
            comm.trace("compute", f"ring_bwd{step}")
            # dq is local: added into in place (inside the kernel on Triton), as are this rank's
            # own dK/dV at step 0; later steps' dK/dV join the travelling accumulator after it
            # arrives, so waiting for it never delays the block's compute
            own = (dkv_own[0][:, krows], dkv_own[1][:, krows]) if step == 0 else (None, None)
            grads = attention_backward_into(
                _rows(do, rows), _rows(q, rows), kv_s[0][:, krows], kv_s[1][:, krows],
                _rows(out, rows), lse[:, :, rows], (dq[:, rows], *own), causal=blk_causal,
                softmax_scale=scale, **_block_segments(segs, rank, src, rows, krows),
            )
            comm.record_attention_work(
                blocks=1, flops=2.5 * _block_flops(b, h, d, _len(rows, n), _len(krows, n), blk_causal),
                kind="attention_backward",
            )
        if step > 0:
            acc = dkv.accumulator(step)
            if grads is not None:
                acc[0][:, krows] += grads[1]
                acc[1][:, krows] += grads[2]
            dkv.send(step)
        kv.end(step)
    others = dkv.result()
    if others is not None:
        dkv_own += others
    return dq, dkv_own[0], dkv_own[1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, layout, causal, scale, overlap, segments):
        segs = None
        if segments is not None:
            segs = ShardSegments.of(segments, group_rank_world(group)[1], layout)
        out, lse = _ring_forward(q, k, v, group=group, layout=layout, causal=causal,
                                 scale=scale, overlap=overlap, segs=segs)
        # the float32 output is kept for the backward's D = do·o term, so bf16 inputs lose no
        # accuracy there (costs b·n·h·d·4 bytes instead of ·2)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (group, layout, causal, scale, overlap)
        ctx.segs = segs
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        group, layout, causal, scale, overlap = ctx.args
        dq, dk, dv = _ring_backward(do.contiguous(), q, k, v, out, lse, group=group,
                                    layout=layout, causal=causal, scale=scale, overlap=overlap,
                                    segs=ctx.segs)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(q, k, v, *, group=None, layout="contiguous", causal=True, softmax_scale=None,
                   overlap=True, segments=None):
    """Exact softmax attention of this rank's query shard against the whole sharded sequence.

    q: `(batch, seq_local, heads, head_dim)`, k/v: `(batch, seq_local, kv_heads, head_dim)`,
    all in `layout` over `group`. Returns `(batch, seq_local, heads, head_dim)` in q's dtype;
    differentiable in q, k and v. See the module docstring for the schedule. `segments`: the
    global `(batch, seq_local · world)` document ids (document masking), the same on every rank.
    """
    _, world = group_rank_world(group)
    check_cp_inputs(q, k, v, world=world, layout=layout, name="ring_attention")
    check_global_segments(segments, q, world, "ring_attention")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _RingAttention.apply(q, k, v, group, layout, bool(causal), scale, bool(overlap),
                                segments)


__all__ = ["ring_attention", "block_plan", "RotatingBuffer", "TravellingSum"]
