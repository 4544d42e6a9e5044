"""LightSeq DistAttn: load-balanced context-parallel attention with helper ranks.

Paper: Li et al., "LightSeq: Sequence Level Parallelism for Distributed Training of Long Context
Transformers" (2023), section 3.1 (DistAttn, load-balanced scheduling, communication overlap).

Data layout: contiguous. With P ranks and N tokens, rank r holds query, key and value chunk r
(tokens [r·n, (r+1)·n), n = N/P): q_r (batch, n, heads, head_dim), k_r/v_r (batch, n, kv_heads,
head_dim). The output o_r has q_r's shape and layout.

Math. Causal attention of chunk i needs the blocks (q_i, kv_j) for j <= i; their partial results
(o_ij, lse_ij) combine exactly by log-sum-exp weighting (float32):

    lse_i = log Σ_j exp(lse_ij),     o_i = Σ_j exp(lse_ij − lse_i) · o_ij.

Schedule (causal, P even, P/2 + 1 steps). Step 0: every rank computes its diagonal block.
Step t = 1..P/2: rank i >= t computes its own block (q_i, kv_{i−t}), fetching kv_{i−t}. A rank
r < t has no earlier chunk left, so it helps: for t < P/2 it computes (q_{r+P−t}, kv_r) — a
block at distance P−t > P/2 that the owner would otherwise reach only after step P/2 — fetching
q_{r+P−t} and returning the partial (o, lse) in float32 to rank r+P−t, which merges it. At the
last step t = P/2 the P/2 blocks (i, i−P/2) are split by query rows: the owner i computes the
first n//2 rows and the kv owner i−P/2 (idle there in the paper's schedule) the other rows.
Every causal block is computed exactly once and every rank computes the same work: the
diagonal plus P/2 − 1/2 off-diagonal blocks (max/mean work = 1 up to rounding n/2; the bound
asked of the schedule is 1 + 1/P; plain causal ring attention: (2P−1)/P). Without the row
split P = 2 would stay as unbalanced as the contiguous ring.
Non-causal attention is balanced already: P steps, step t computes (q_r, kv_{(r−t) mod P}).

Backward (same schedule, custom autograd): with the global o_i and lse_i saved by the forward
pass, a block's gradients need only (q_i, do_i, lse_i, D_i = rowsum(do_i ∘ o_i)) and kv_j:
dq_i += dS_ij k_j, dk_j += dS_ijᵀ q_i, dv_j += P_ijᵀ do_i with P_ij = exp(s_ij − lse_i),
dS_ij = P_ij ∘ (do_i v_jᵀ − D_i) · scale. The block's computer keeps the gradients of what it
owns and returns the rest in float32: owners return dk/dv to the kv owner, helpers return dq
to the query owner. The forward pass is never re-run.

Document masking (`segments`, the global `(batch, N)` ids on every rank): each block computes
with its query rows' and key chunk's ids (chunk r's are columns [r·n, (r+1)·n)), so helpers
need no extra transfer.

Overlap: each step's transfers are posted before the previous step computes
(`comm.trace('post') ... ('compute') ... ('wait')`), partial results are sent right after they
are computed and merged one step later. `overlap=False` waits on every transfer at once.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ctxscale.dist import comm
from ctxscale.kernels import (
    attention,
    attention_backward_into,
    attention_forward,
    attention_forward_merge,
    merge_attention,
)
from ctxscale.kernels.attention import attention_flops
from ctxscale.kernels.attention_tiles import _segment_kwargs


# ---------------------------------------------------------------- schedule
def lightseq_schedule(world_size: int, causal: bool):
    """Per step, per rank: (own_kv, help_q). own_kv: the rank whose kv this rank's queries meet
    at this step (None: no own block); help_q: the rank whose queries this rank computes against
    its own kv as a helper (None: no help). Step 0 is the local block."""
    P = world_size
    if not causal:
        return [[((r - t) % P, None) for r in range(P)] for t in range(P)]
    _check_even(P)
    steps = [[(r, None) for r in range(P)]]
    for t in range(1, P // 2 + 1):
        steps.append([
            (r - t if r >= t else None, r + P - t if r < t else None)
            for r in range(P)
        ])
    return steps


def split_step(world_size: int, causal: bool):
    """The step whose blocks are split by query rows (owner: first half, helper: second half),
    or None. Causal: the last step, t = P/2 (owner i and helper i − P/2 share block (i, i−P/2))."""
    return world_size // 2 if causal else None


def row_halves(seq_local: int) -> tuple[slice, slice]:
    """(owner rows, helper rows) of a split block."""
    return slice(0, seq_local // 2), slice(seq_local // 2, seq_local)


def _check_even(world_size: int) -> None:
    if world_size % 2:
        raise ValueError(
            f"LightSeq's load-balanced schedule pairs ranks and needs an even number of "
            f"context-parallel ranks; got {world_size}. Use an even context-parallel size, or "
            "method='ring' with layout='zigzag' (balanced for any size)"
        )


# ---------------------------------------------------------------- helpers
def _block_backward(do, q, k, v, lse, delta, grads, *, causal, scale, seg_kw):
    """Gradients of one block given the global lse and D = rowsum(do ∘ o), without shipping o.

    attention_backward uses o only through D = rowsum(do ∘ o), so any stand-in o with that row
    sum gives the same gradients; o' = do · D / |do|² is one (o' = 0 where do = 0, where D = 0
    too). Unlike passing D through `dlse`, this keeps the fast fused kernel available.
    `grads` (dq, dk, dv; None entries returned fresh) are added into in place, inside the
    kernel on Triton (`attention_backward_into`)."""
    cdt = torch.float64 if do.dtype == torch.float64 else torch.float32
    dd = do.to(cdt)
    d = delta.to(cdt).transpose(1, 2).unsqueeze(-1)  # (b, n, h, 1)
    norm = (dd * dd).sum(-1, keepdim=True)
    stand_in = torch.where(norm > 0, dd * (d / norm.clamp_min(torch.finfo(cdt).tiny)), 0.0)
    return attention_backward_into(do, q, k, v, stand_in, lse, grads, causal=causal,
                                   softmax_scale=scale, **seg_kw)


def _segments_of(segments, n):
    """seg(rank, rows) -> kernel kwargs {q_segments, k_segments} for (query chunk, key chunk)."""
    def kw(q_rank, rows, k_rank):
        if segments is None:
            return {}
        return {"q_segments": segments[:, q_rank * n:(q_rank + 1) * n][:, rows],
                "k_segments": segments[:, k_rank * n:(k_rank + 1) * n]}
    return kw


def _flops(q, k, causal):
    b, n, h, d = q.shape
    return attention_flops(b, n, k.shape[1], h, d, causal)


class _Messages:
    """Posts one logical slot of transfers; every rank posts the same slots in the same order,
    so sends and receives between a pair of ranks match."""

    def __init__(self, group, overlap: bool):
        self.group, self.overlap = group, overlap
        self.pending = []  # (handle, tensors kept alive until waited)

    def post(self, sends, recvs, tag):
        if not sends and not recvs:
            return None
        handle = comm.exchange(sends, recvs, group=self.group, tag=tag)
        if not self.overlap:
            handle.wait()
        return handle


# ---------------------------------------------------------------- forward
def _forward(q, k, v, group, causal, scale, overlap, segments=None):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    seg = _segments_of(segments, q.shape[1])
    steps = lightseq_schedule(world, causal)
    msgs = _Messages(group, overlap)
    every, split = slice(None), split_step(world, causal)
    own_half, help_half = row_halves(q.shape[1])

    def rows(t):  # (own rows, help rows) at step t
        return (own_half, help_half) if t == split else (every, every)

    def fetch(t):
        sends, recvs, bufs = [], [], {}
        _, hr = rows(t)
        for s, (own_kv, help_q) in enumerate(steps[t]):
            if own_kv == rank and s != rank:
                sends += [(k, s), (v, s)]
            if help_q == rank:
                sends.append((q[:, hr].contiguous(), s))
        own_kv, help_q = steps[t][rank]
        if own_kv is not None and own_kv != rank:
            bufs["kv"] = (torch.empty_like(k), torch.empty_like(v))
            recvs += [(bufs["kv"][0], own_kv), (bufs["kv"][1], own_kv)]
        if help_q is not None:
            bufs["q"] = torch.empty_like(q[:, hr])
            recvs.append((bufs["q"], help_q))
        return msgs.post(sends, recvs, f"fwd{t}"), bufs

    o_acc = lse_acc = None
    returned = []  # (handle, [(o_buf, lse_buf)]) of helper results, merged one step later
    sent = []
    nxt = fetch(0)
    for t in range(len(steps)):
        handle, bufs = nxt
        if t + 1 < len(steps):
            nxt = fetch(t + 1)  # post the next transfers before computing this step
        if handle is not None:
            handle.wait()
        own_kv, help_q = steps[t][rank]
        own_rows, help_rows = rows(t)
        ret_sends = []
        if own_kv is not None:
            kk, vv = bufs.get("kv", (k, v))
            diag = causal and own_kv == rank
            q_own = q[:, own_rows]
            comm.trace("compute", f"fwd{t}")
            seg_kw = seg(rank, own_rows, own_kv)
            if o_acc is None:  # step 0 (the diagonal, or kv_r when non-causal) covers all rows
                o_t, lse_t = attention_forward(q_own, kk, vv, causal=diag, softmax_scale=scale,
                                               **seg_kw)
                o_acc, lse_acc = o_t.float(), lse_t.float()
            else:  # merged in place (inside the kernel on Triton)
                attention_forward_merge(q_own, kk, vv, o_acc[:, own_rows],
                                        lse_acc[:, :, own_rows], causal=diag, softmax_scale=scale,
                                        **seg_kw)
            comm.record_attention_work(blocks=1, flops=_flops(q_own, kk, diag))
        if help_q is not None:
            comm.trace("compute", f"fwd{t}-help")
            o_h, lse_h = attention_forward(bufs["q"], k, v, causal=False, softmax_scale=scale,
                                           **seg(help_q, help_rows, rank))
            comm.record_attention_work(blocks=1, flops=_flops(bufs["q"], k, False))
            ret_sends = [(o_h.float().contiguous(), help_q), (lse_h.float().contiguous(), help_q)]
        ret_bufs, recvs = [], []
        for s, (_, hq) in enumerate(steps[t]):
            if hq == rank:  # rank s helps us at this step: receive its partial (o, lse)
                b, n, h, _ = q[:, help_rows].shape
                o_b = q.new_empty((b, n, h, v.shape[-1]), dtype=torch.float32)
                l_b = q.new_empty((b, h, n), dtype=torch.float32)
                ret_bufs.append((o_b, l_b, help_rows))
                recvs += [(o_b, s), (l_b, s)]
        h_ret = msgs.post(ret_sends, recvs, f"fwd{t}-ret")
        if ret_sends:
            sent.append((h_ret, ret_sends))
        for h_prev, prev in returned:  # results of the previous step: merge now
            h_prev.wait()
            for o_b, l_b, hr in prev:
                merge_attention(o_acc[:, hr], lse_acc[:, :, hr], o_b, l_b)
        returned = [(h_ret, ret_bufs)] if ret_bufs else []
    for h_prev, prev in returned:
        h_prev.wait()
        for o_b, l_b, hr in prev:
            merge_attention(o_acc[:, hr], lse_acc[:, :, hr], o_b, l_b)
    for h, _ in sent:
        h.wait()
    return o_acc, lse_acc


# ---------------------------------------------------------------- backward
def _backward(do, q, k, v, o, lse, group, causal, scale, overlap, segments=None):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    seg = _segments_of(segments, q.shape[1])
    steps = lightseq_schedule(world, causal)
    msgs = _Messages(group, overlap)
    do = do.contiguous()
    delta = (do.float() * o.float()).sum(-1).transpose(1, 2).contiguous()  # (b, h, n)
    lse = lse.contiguous()
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    every, split = slice(None), split_step(world, causal)
    own_half, help_half = row_halves(q.shape[1])

    def rows(t):
        return (own_half, help_half) if t == split else (every, every)

    def query_side(hr):  # what a helper needs of the queries' rows hr
        return [q[:, hr], do[:, hr], lse[:, :, hr], delta[:, :, hr]]

    def fetch(t):
        sends, recvs, bufs = [], [], {}
        _, hr = rows(t)
        for s, (own_kv, help_q) in enumerate(steps[t]):
            if own_kv == rank and s != rank:
                sends += [(k, s), (v, s)]
            if help_q == rank:
                sends += [(x.contiguous(), s) for x in query_side(hr)]
        own_kv, help_q = steps[t][rank]
        if own_kv is not None and own_kv != rank:
            bufs["kv"] = (torch.empty_like(k), torch.empty_like(v))
            recvs += [(b, own_kv) for b in bufs["kv"]]
        if help_q is not None:
            bufs["q"] = tuple(torch.empty_like(x) for x in query_side(hr))
            recvs += [(b, help_q) for b in bufs["q"]]
        return msgs.post(sends, recvs, f"bwd{t}"), bufs

    returned, sent = [], []
    nxt = fetch(0)
    for t in range(len(steps)):
        handle, bufs = nxt
        if t + 1 < len(steps):
            nxt = fetch(t + 1)
        if handle is not None:
            handle.wait()
        own_kv, help_q = steps[t][rank]
        own_rows, help_rows = rows(t)
        ret_sends = []
        if own_kv is not None:
            kk, vv = bufs.get("kv", (k, v))
            diag = causal and own_kv == rank
            q_o, do_o, lse_o, delta_o = query_side(own_rows)
            comm.trace("compute", f"bwd{t}")
            own = (dk, dv) if own_kv == rank else (None, None)  # else sent to their owner
            _, dk_t, dv_t = _block_backward(do_o, q_o, kk, vv, lse_o, delta_o,
                                            (dq[:, own_rows], *own), causal=diag, scale=scale,
                                            seg_kw=seg(rank, own_rows, own_kv))
            comm.record_attention_work(blocks=1, flops=2.5 * _flops(q_o, kk, diag),
                                       kind="attention_backward")
            if own_kv != rank:
                ret_sends += [(dk_t.contiguous(), own_kv), (dv_t.contiguous(), own_kv)]
        if help_q is not None:
            hq, hdo, hlse, hdelta = bufs["q"]
            comm.trace("compute", f"bwd{t}-help")
            dq_h, _, _ = _block_backward(hdo, hq, k, v, hlse, hdelta, (None, dk, dv),
                                         causal=False, scale=scale,
                                         seg_kw=seg(help_q, help_rows, rank))
            comm.record_attention_work(blocks=1, flops=2.5 * _flops(hq, k, False),
                                       kind="attention_backward")
            ret_sends.append((dq_h.contiguous(), help_q))
        recvs, targets = [], []
        for s, (own_kv_s, help_q_s) in enumerate(steps[t]):
            if own_kv_s == rank and s != rank:
                bk, bv = torch.empty_like(dk), torch.empty_like(dv)
                recvs += [(bk, s), (bv, s)]
                targets += [(dk, bk), (dv, bv)]
            if help_q_s == rank:
                bq = torch.empty_like(dq[:, help_rows])
                recvs.append((bq, s))
                targets.append((dq[:, help_rows], bq))
        h_ret = msgs.post(ret_sends, recvs, f"bwd{t}-ret")
        if ret_sends:
            sent.append((h_ret, ret_sends))
        for h_prev, prev in returned:
            h_prev.wait()
            for acc, buf in prev:
                acc += buf
        returned = [(h_ret, targets)] if targets else []
    for h_prev, prev in returned:
        h_prev.wait()
        for acc, buf in prev:
            acc += buf
    for h, _ in sent:
        h.wait()
    return dq, dk, dv


class _LightSeqAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, causal, scale, overlap, segments):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _forward(q, k, v, group, causal, scale, overlap, segments)
        o = o.to(q.dtype)
        # Saved for the backward pass, which therefore never re-runs the forward attention.
        ctx.save_for_backward(q, k, v, o, lse, segments)
        ctx.args = (group, causal, scale, overlap)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, segments = ctx.saved_tensors
        group, causal, scale, overlap = ctx.args
        dq, dk, dv = _backward(do, q, k, v, o, lse, group, causal, scale, overlap, segments)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def lightseq_attention(q, k, v, *, group=None, causal=True, softmax_scale=None, overlap=True,
                       segments=None):
    """LightSeq DistAttn over the ranks of `group` (see the module docstring).

    q: (batch, N/P, heads, head_dim), k/v: (batch, N/P, kv_heads, head_dim): this rank's
    contiguous chunk. Returns o: (batch, N/P, heads, head_dim). Differentiable. `segments`: the
    global `(batch, N)` document ids (document masking), the same on every rank.
    """
    from ctxscale.dist.ring import check_global_segments

    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k.shape != v.shape:
        raise ValueError(
            "lightseq_attention expects (batch, seq_local, heads, head_dim) tensors with k and v "
            f"of one shape; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape[1] != k.shape[1]:
        raise ValueError(
            f"q has {q.shape[1]} local tokens and k/v {k.shape[1]}: every rank must hold the same "
            "number of query and key tokens (its contiguous chunk of the sequence)"
        )
    single = not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1
    check_global_segments(segments, q, 1 if single else dist.get_world_size(group),
                          "lightseq_attention")
    if single:
        return attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                         **_segment_kwargs(segments, segments))
    _check_even(dist.get_world_size(group))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    return _LightSeqAttention.apply(q, k, v, group, causal, scale, overlap, segments)
