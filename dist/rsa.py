"""Ring Self-Attention (RSA): the sequence-parallel attention of Li, Xue, Baranwal, Li, You,
"Sequence Parallelism: Long Sequence Training from System Perspective" (ACL 2023, arXiv 2105.13120).

It is the baseline that LightSeq (Li et al., 2023) and ring attention improve on: unlike them it
materializes this rank's rows of the score matrix, `(N/P) x N` per head, and takes two separate
synchronous rings.

Forward, on rank r with local query/key/value shards Q_r, K_r, V_r (n = N/P rows each):
1. K ring: at step t the rank holds K_s, s = (r − t) mod P, and fills score columns of source
   s: S_r[:, s] = scale · Q_r K_sᵀ (masked by global positions when causal: key position >
   query position → −inf). After P steps S_r is this rank's full `(n, N)` block of rows.
2. A_r = softmax(S_r) along the N columns (float32).
3. V ring: O_r = Σ_s A_r[:, s] V_s as V_s goes round.

Backward, by the same rings (A_r is kept from the forward):
1. V ring: dA_r[:, s] = dO_r V_sᵀ; the contribution A_r[:, s]ᵀ dO_r to dV_s travels round the
   ring with an accumulator that reaches rank s after P − 1 hops.
2. dS_r = A_r ⊙ (dA_r − rowsum(dA_r ⊙ A_r)) · scale.
3. K ring: dQ_r = Σ_s dS_r[:, s] K_s; the contribution dS_r[:, s]ᵀ Q_r to dK_s travels to
   rank s like dV. (The paper's Megatron/ColossalAI code sums dK and dV with an all-reduce of
   the full `(N, ...)` tensors and slices; the ring accumulator sends the same sums with a
   P-times smaller message per hop.)

Every block is computed, masked or not, as in the original (it masks the full score rows). The
rings are synchronous (post, wait, compute), as in the original.

Shapes: q `(batch, seq_local, heads, head_dim)`, k/v `(batch, seq_local, kv_heads, head_dim)`
(grouped-query attention when kv_heads < heads; k/v are never repeated). Any layout of
`ctxscale.dist.layout` works: the mask is built from global positions.

Bytes per rank, each way (n = N/P, e = element size of k/v, float32 accumulators):
    forward   2·(P−1)·b·n·h_kv·d·e                       (K ring, then V ring)
    backward  2·(P−1)·b·n·h_kv·d·e + 2·(P−1)·b·n·h_kv·d·4  (V and K again, dV and dK sums)
Memory: the `(batch, heads, n, N)` float32 score/probability matrix (the cost LightSeq removes).
"""

from __future__ import annotations

import torch
from ctxscale.dist import comm
from ctxscale.dist.layout import global_positions
from ctxscale.dist.ring import (
    RotatingBuffer,
    TravellingSum,
    check_cp_inputs,
    check_global_segments,
    group_rank_world,
)


def _cdt(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grouped(x, kv_heads):
    """(b, n, h, d) -> (b, kv_heads, h // kv_heads, n, d)."""
    b, n, h, d = x.shape
    return x.reshape(b, n, kv_heads, h // kv_heads, d).permute(0, 2, 3, 1, 4)


def _ungrouped(x):
    """(b, kv_heads, g, n, d) -> (b, n, kv_heads·g, d)."""
    b, hk, g, n, d = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(b, n, hk * g, d)


def _kv_heads_first(x):
    """(b, n, hk, d) -> (b, hk, 1, n, d): broadcast over the query heads of a group."""
    return x.permute(0, 2, 1, 3).unsqueeze(2)


def _kv_from_grouped(x):
    """Sum over the query heads of a group: (b, hk, g, n, d) -> (b, n, hk, d)."""
    return x.sum(2).permute(0, 2, 1, 3)


def _columns(src, n):
    return slice(src * n, (src + 1) * n)


def _rsa_forward(q, k, v, *, group, layout, causal, scale, segments=None):
    rank, world = group_rank_world(group)
    b, n, h, d = q.shape
    hk = k.shape[2]
    cdt = _cdt(q.dtype)
    qg = _grouped(q.to(cdt), hk)
    scores = torch.empty(b, hk, h // hk, n, world * n, dtype=cdt, device=q.device)
    pos_q = global_positions(n * world, rank, world, layout, device=q.device)
    ring_k = RotatingBuffer(k, group=group, rank=rank, world=world, overlap=False, tag="rsa_fwd_k")
    for step in range(world):
        src = (rank - step) % world
        k_s = ring_k.begin(step)
        comm.trace("compute", f"rsa_fwd_qk{step}")
        block = torch.matmul(qg, _kv_heads_first(k_s.to(cdt)).transpose(-1, -2)) * scale
        pos_k = global_positions(n * world, src, world, layout, device=q.device)
        if causal:
            block = block.masked_fill(pos_k[None, :] > pos_q[:, None], float("-inf"))
        if segments is not None:  # document masking: another document's keys are hidden
            other = segments[:, pos_q, None] != segments[:, None, pos_k]
            block = block.masked_fill(other[:, None, None], float("-inf"))
        scores[..., _columns(src, n)] = block
        ring_k.end(step)
    probs = torch.softmax(scores, dim=-1)  # every row sees its own token: no empty rows
    del scores
    out = torch.zeros(b, hk, h // hk, n, v.shape[-1], dtype=cdt, device=q.device)
    ring_v = RotatingBuffer(v, group=group, rank=rank, world=world, overlap=False, tag="rsa_fwd_v")
    for step in range(world):
        src = (rank - step) % world
        v_s = ring_v.begin(step)
        comm.trace("compute", f"rsa_fwd_av{step}")
        out += torch.matmul(probs[..., _columns(src, n)], _kv_heads_first(v_s.to(cdt)))
        comm.record_attention_work(blocks=1, flops=4.0 * b * h * n * n * d)
        ring_v.end(step)
    return _ungrouped(out), probs


def _reduce_round_ring(x_local, contribution, *, group, tag):
    """Run P ring steps with `x_local` travelling round; `contribution(step, src, x_src)`
    returns this rank's gradient for source src (shape of x, float), summed on its owner."""
    rank, world = group_rank_world(group)
    ring = RotatingBuffer(x_local, group=group, rank=rank, world=world, overlap=False,
                          tag=f"{tag}_x")
    own = None
    acc_ring = None
    for step in range(world):
        src = (rank - step) % world
        x_s = ring.begin(step)
        part = contribution(step, src, x_s)
        if step == 0:
            own = part
            acc_ring = TravellingSum(part, group=group, rank=rank, world=world, overlap=False,
                                     tag=f"{tag}_acc")
        else:
            acc_ring.accumulator(step).add_(part)
            acc_ring.send(step)
        ring.end(step)
    others = acc_ring.result()
    return own if others is None else own + others


def _rsa_backward(do, q, k, v, probs, *, group, layout, causal, scale):
    _, world = group_rank_world(group)
    b, n, h, d = q.shape
    hk = k.shape[2]
    cdt = probs.dtype
    qg = _grouped(q.to(cdt), hk)
    dog = _grouped(do.to(cdt), hk)
    dprobs = torch.empty_like(probs)

    def dv_part(step, src, v_s):
        cols = _columns(src, n)
        comm.trace("compute", f"rsa_bwd_av{step}")
        dprobs[..., cols] = torch.matmul(dog, _kv_heads_first(v_s.to(cdt)).transpose(-1, -2))
        return _kv_from_grouped(torch.matmul(probs[..., cols].transpose(-1, -2), dog))

    dv = _reduce_round_ring(v, dv_part, group=group, tag="rsa_bwd_v")
    dscores = probs * (dprobs - (dprobs * probs).sum(-1, keepdim=True)) * scale
    dq = torch.zeros_like(qg)

    def dk_part(step, src, k_s):
        cols = _columns(src, n)
        comm.trace("compute", f"rsa_bwd_qk{step}")
        dq.add_(torch.matmul(dscores[..., cols], _kv_heads_first(k_s.to(cdt))))
        return _kv_from_grouped(torch.matmul(dscores[..., cols].transpose(-1, -2), qg))

    dk = _reduce_round_ring(k, dk_part, group=group, tag="rsa_bwd_k")
    return _ungrouped(dq), dk, dv


class _RingSelfAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, layout, causal, scale, segments):
        out, probs = _rsa_forward(q, k, v, group=group, layout=layout, causal=causal, scale=scale,
                                  segments=segments)
        ctx.save_for_backward(q, k, v, probs)
        ctx.args = (group, layout, causal, scale)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, probs = ctx.saved_tensors
        group, layout, causal, scale = ctx.args
        dq, dk, dv = _rsa_backward(do, q, k, v, probs, group=group, layout=layout,
                                   causal=causal, scale=scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def ring_self_attention(q, k, v, *, group=None, layout="contiguous", causal=True,
                        softmax_scale=None, segments=None):
    """Ring Self-Attention of this rank's shard (see the module docstring).

    q: `(batch, seq_local, heads, head_dim)`, k/v: `(batch, seq_local, kv_heads, head_dim)` in
    `layout` over `group`. Returns `(batch, seq_local, heads, head_dim)` in q's dtype.
    `segments`: the global `(batch, N)` document ids (document masking), the same on every rank.
    """
    _, world = group_rank_world(group)
    check_cp_inputs(q, k, v, world=world, layout=layout, name="ring_self_attention")
    check_global_segments(segments, q, world, "ring_self_attention")
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    return _RingSelfAttention.apply(q, k, v, group, layout, bool(causal), scale, segments)


__all__ = ["ring_self_attention"]
