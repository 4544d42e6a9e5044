"""Chunked causal linear attention with scalar decay (simple GLA) in Triton, forward and backward.

Papers: Qin et al., "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths
in Large Language Models" (2024) for the intra/inter-chunk split; Yang et al., "Gated Linear
Attention Transformers with Hardware-Efficient Training" (2023) for the decay (simple GLA, the
semantics of `fla.ops.simple_gla`). Recurrence (per batch and head, state dim_k x dim_v):

    S_t = exp(g_t) · S_{t-1} + k_t v_tᵀ,        o_t = scale · q_tᵀ S_t

Chunk form with C tokens per chunk and G_i = Σ_{j≤i in chunk} g_j, D_ij = e^{G_i − G_j} [j ≤ i]:

    O_c    = scale · [ ((Q Kᵀ) ⊙ D) V + (e^{G} ⊙ Q) S_{c−1} ]
    S_c    = e^{G_C} S_{c−1} + (e^{G_C − G} ⊙ K)ᵀ V

Backward, with dS the gradient flowing into S_c from later chunks (reverse sweep):

    dQ = scale · [ ((dO Vᵀ) ⊙ D) K + e^{G} ⊙ (dO S_{c−1}ᵀ) ]                        (forward sweep)
    dK = scale · ((V dOᵀ) ⊙ Dᵀ) Q + e^{G_C − G} ⊙ (V dSᵀ),
    dV = scale · ((K Qᵀ) ⊙ Dᵀ) dO + (e^{G_C − G} ⊙ K) dS,
    dS ← e^{G_C} dS + scale (e^{G} ⊙ Q)ᵀ dO,      d initial_state = dS after chunk 0
    dg_t = Σ_{s≥t} (q_s·dq_s − k_s·dk_s) (+ <dS_N, S_N> at s = N)    (reverse cumsum, PyTorch)

Every exponent is ≤ 0 for decays ≤ 1 (masked before the exponential), so nothing overflows.

Schedule (the "chunk" form of flash-linear-attention, parallel over chunks): a sweep kernel, one
program per (dim_k block, dim_v block, batch·head), walks the chunks in order and stores the state
entering each chunk (S_{c−1}); the output kernel then runs every (dim_v block, chunk, batch·head)
at once. Backward recomputes the entering states (one sweep; nothing but q, k, v, the decay and
the final state is kept from the forward), the same sweep kernel run backwards stores each
chunk's dS, and two
chunk-parallel kernels form dq, dk (with q·dq − k·dk for the decay gradient) and dv. Dot products
read their operands in the input dtype with float32 accumulation, so bfloat16 / float16 inputs
run on tensor cores (the intra-chunk scores and the states are rounded to the input dtype before
their products, as in flash-linear-attention); float32 inputs use IEEE float32 products, or TF32
when `torch.backends.cuda.matmul.allow_tf32` is set. The per-chunk states take
b·h·(seq/64)·dk·dv elements: bfloat16 for bfloat16 inputs, float32 otherwise.

Layout: q, k `(batch, seq, heads_qk, dim_k)`, v `(batch, seq, heads, dim_v)` (heads_qk dividing
heads: head i reads q/k head i // (heads / heads_qk), the grouped q/k of Mamba-2; the backward
forms each head's dq, dk and sums a group's), log_decay `(batch, seq, heads)`, `(heads,)` or None, states `(batch, heads, dim_k, dim_v)` float32; scale defaults to
dim_k ** -0.5. Reference and dispatcher: `kernels/linear_attention.py`.

Packed documents (`segments`, `(batch, seq)` document ids; semantics in
`kernels/recurrent_segments.py`): the state resets to zero where the id changes. With r_i the
document index (run) of token i, r_prev that of the token before the chunk (token 0's for the
first chunk) and r_end that of the chunk's last token, the chunk form gains four masks:
D_ij ⊙ [r_i = r_j]; the read of S_{c−1} by query i ⊙ [r_i = r_prev]; key j's share of S_c
⊙ [r_j = r_end]; the carry e^{G_C} S_{c−1} ⊙ [r_end = r_prev]; and G restarts at each
document start (a segmented cumsum), so no document's exponents hold another's decays. The
backward applies the same masks (they are the transposes), and dg needs nothing more: a masked
pair contributes to neither q·dq nor k·dk. The runs (`runs_with_previous`, int32) are formed on
the host without a sync; the masks sit behind the constexpr HAS_SEGMENTS, so calls without
segments compile as before.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ctxscale.kernels.dispatch import triton_runnable
from ctxscale.kernels.recurrent_segments import runs_with_previous, valid_segments
from ctxscale.kernels.triton_launch import INTERPRET, dot_precision, launch

MAX_DIM = 256


@triton.jit
def _chunk_decay(G_PTR, offs_t, t_mask, HAS_DECAY: tl.constexpr, C: tl.constexpr):
    """Within-chunk inclusive cumsum G (C,) and its total G_C (padded positions add 0)."""
    if HAS_DECAY:
        g = tl.load(G_PTR + offs_t, mask=t_mask, other=0.0).to(tl.float32)
        G = tl.cumsum(g, 0)
        G_end = tl.sum(g, 0)
    else:
        G = tl.zeros([C], dtype=tl.float32)
        G_end = tl.sum(G, 0)
    return G, G_end


@triton.jit
def _restarting_sum(a, a_start, b, b_start):
    """Combine of a cumulative sum that restarts where a document starts (b_start)."""
    return tl.where(b_start, b, a + b), a_start | b_start


@triton.jit
def _chunk_runs_decay(RUN_ROW, c, seq, G_PTR, offs_g, HAS_DECAY: tl.constexpr, C: tl.constexpr):
    """`_chunk_decay` for packed documents, with the runs: run (C,) of chunk c's tokens (padding
    −1), r_prev (the token before the chunk; token 0's for the first) and r_end (its last token).
    G restarts at each document start, so a document's exponents hold its own decays only (no
    rounding shared with another's); G_end is the last document's total
    (all that is read of it: the carry needs one document, key j's weight r_j = r_end).
    RUN_ROW: the row of `runs_with_previous`, whose entry t is the run of token t − 1."""
    offs_t = c * C + tl.arange(0, C)
    t_mask = offs_t < seq
    run = tl.load(RUN_ROW + offs_t + 1, mask=t_mask, other=-1)
    run_prev = tl.load(RUN_ROW + c * C)
    run_end = tl.load(RUN_ROW + tl.minimum(c * C + C, seq))
    if HAS_DECAY:
        g = tl.load(G_PTR + offs_g, mask=t_mask, other=0.0).to(tl.float32)
        starts = run != tl.load(RUN_ROW + offs_t, mask=t_mask, other=-1)
        G, _ = tl.associative_scan((g, starts), 0, _restarting_sum)
        G_end = tl.sum(tl.where(run == run_end, g, 0.0), 0)
    else:
        G = tl.zeros([C], dtype=tl.float32)
        G_end = tl.sum(G, 0)
    return run, run_prev, run_end, G, G_end


@triton.jit
def _la_sweep_kernel(A, B, G_LOG, INIT, STATES, FINAL, RUNS,
                     stride_ab, stride_as, stride_ah, stride_bb, stride_bs, stride_bh,
                     stride_gb, stride_gs, num_heads, qk_group, seq, dim_k, dim_v, n_chunks,
                     scale,
                     HAS_DECAY: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                     HAS_INIT: tl.constexpr, STORE_FINAL: tl.constexpr,
                     REVERSE: tl.constexpr, C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr,
                     DOT_PREC: tl.constexpr):
    """The sequential part, one (BK, BV) block of the state per program, over the chunks:

    forward (A = K, B = V):   STATES[c] = S_{c−1};  S_c = e^{G_C} S_{c−1} + (e^{G_C − G} ⊙ K)ᵀ V
    reverse (A = Q, B = dO):  STATES[c] = dS_c;     dS_{c−1} = e^{G_C} dS_c + scale (e^G ⊙ Q)ᵀ dO

    walking the chunks backwards for REVERSE; INIT is S0 (or dS_N, the final state's gradient),
    FINAL receives S_N (or dS_{−1}, the initial state's gradient). A (k or q) has one head per
    `qk_group` heads of B (grouped q/k). HAS_SEGMENTS (RUNS: `runs_with_previous`): the carry
    needs r_end = r_prev; forward, key j reaches S_c if r_j = r_end; reverse, query i read
    S_{c−1} if r_i = r_prev."""
    i_k, i_v, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    kv_mask = (offs_k < dim_k)[:, None] & (offs_v < dim_v)[None, :]
    state_off = bh.to(tl.int64) * dim_k * dim_v + offs_k[:, None] * dim_v + offs_v[None, :]
    states_base = STATES + bh.to(tl.int64) * n_chunks * dim_k * dim_v
    if HAS_INIT:
        S = tl.load(INIT + state_off, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    a_base = A + b * stride_ab + (h // qk_group) * stride_ah
    b_base = B + b * stride_bb + h * stride_bh
    g_base = G_LOG + b * stride_gb + h
    for i in range(n_chunks):
        c = n_chunks - 1 - i if REVERSE else i
        chunk_off = c * dim_k * dim_v + offs_k[:, None] * dim_v + offs_v[None, :]
        tl.store(states_base + chunk_off, S.to(STATES.dtype.element_ty), mask=kv_mask)
        offs_t = c * C + tl.arange(0, C)
        t_mask = offs_t < seq
        a = tl.load(a_base + offs_t[:, None] * stride_as + offs_k[None, :],
                    mask=t_mask[:, None] & (offs_k < dim_k)[None, :], other=0.0)
        bv = tl.load(b_base + offs_t[:, None] * stride_bs + offs_v[None, :],
                     mask=t_mask[:, None] & (offs_v < dim_v)[None, :], other=0.0)
        if HAS_SEGMENTS:
            run, run_prev, run_end, G, G_end = _chunk_runs_decay(
                RUNS + b * (seq + 1), c, seq, g_base, offs_t * stride_gs, HAS_DECAY, C)
        else:
            G, G_end = _chunk_decay(g_base, offs_t * stride_gs, t_mask, HAS_DECAY, C)
        weight = tl.exp(G) * scale if REVERSE else tl.exp(G_end - G)
        if HAS_SEGMENTS:
            weight = tl.where(run == (run_prev if REVERSE else run_end), weight, 0.0)
        a_dec = (a.to(tl.float32) * weight[:, None]).to(bv.dtype)
        carry = tl.exp(G_end)
        if HAS_SEGMENTS:
            carry = tl.where(run_end == run_prev, carry, 0.0)
        S = S * carry + tl.dot(tl.trans(a_dec), bv, input_precision=DOT_PREC)
    if STORE_FINAL:
        tl.store(FINAL + state_off, S, mask=kv_mask)


@triton.jit
def _la_out_kernel(Q, K, V, G_LOG, HS, OUT, RUNS,
                   stride_qb, stride_qs, stride_qh, stride_vb, stride_vs, stride_vh,
                   stride_gb, stride_gs, num_heads, qk_group, seq, dim_k, dim_v, n_chunks, scale,
                   HAS_DECAY: tl.constexpr, HAS_SEGMENTS: tl.constexpr, C: tl.constexpr,
                   BK: tl.constexpr,
                   BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk's outputs: O_c = scale [((Q Kᵀ) ⊙ D) V + (e^G ⊙ Q) S_{c-1}], all chunks at once."""
    i_v, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_t = c * C + tl.arange(0, C)
    t_mask = offs_t < seq
    offs_v = i_v * BV + tl.arange(0, BV)
    v_mask = offs_v < dim_v
    hq = h // qk_group
    q_base = Q + b * stride_qb + hq * stride_qh + offs_t[:, None] * stride_qs
    k_base = K + b * stride_qb + hq * stride_qh + offs_t[:, None] * stride_qs
    hs_base = HS + (bh.to(tl.int64) * n_chunks + c) * dim_k * dim_v + offs_v[None, :]
    scores = tl.zeros([C, C], dtype=tl.float32)
    o_inter = tl.zeros([C, BV], dtype=tl.float32)
    for k0 in range(0, dim_k, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < dim_k
        q = tl.load(q_base + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        k = tl.load(k_base + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        hs = tl.load(hs_base + offs_k[:, None] * dim_v, mask=k_mask[:, None] & v_mask[None, :],
                     other=0.0).to(q.dtype)
        scores += tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        o_inter += tl.dot(q, hs, input_precision=DOT_PREC)
    if HAS_SEGMENTS:
        run, run_prev, run_end, G, G_end = _chunk_runs_decay(
            RUNS + b * (seq + 1), c, seq, G_LOG + b * stride_gb + h, offs_t * stride_gs,
            HAS_DECAY, C)
    else:
        G, G_end = _chunk_decay(G_LOG + b * stride_gb + h, offs_t * stride_gs, t_mask,
                                HAS_DECAY, C)
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    if HAS_SEGMENTS:
        causal = causal & (run[:, None] == run[None, :])
    scores = scores * tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
    tv_mask = t_mask[:, None] & v_mask[None, :]
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_t[:, None] * stride_vs + offs_v[None, :],
                mask=tv_mask, other=0.0)
    o = tl.dot(scores.to(v.dtype), v, input_precision=DOT_PREC)
    to_q = tl.exp(G)
    if HAS_SEGMENTS:  # S_{c-1} reaches the chunk's first document only
        to_q = tl.where(run == run_prev, to_q, 0.0)
    o = o + o_inter * to_q[:, None]
    tl.store(OUT + b * stride_vb + h * stride_vh + offs_t[:, None] * stride_vs + offs_v[None, :],
             (o * scale).to(OUT.dtype.element_ty), mask=tv_mask)


@triton.jit
def _la_bwd_dqdk_kernel(Q, K, V, DO, G_LOG, HS, DHS, DQ, DK, DG_PART, RUNS,
                        stride_qb, stride_qs, stride_qh, stride_vb, stride_vs, stride_vh,
                        stride_gb, stride_gs, stride_dg_part, stride_db, stride_ds, stride_dh,
                        num_heads, qk_group, seq, dim_k, dim_v, n_chunks, scale,
                        HAS_DECAY: tl.constexpr, HAS_SEGMENTS: tl.constexpr, C: tl.constexpr,
                        BK: tl.constexpr,
                        BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk's dq and dk for one dim_k block (and that block's share of q·dq − k·dk). With
    grouped q/k, DQ and DK (strides stride_d*) hold each head's share; the wrapper sums a group."""
    i_k, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_t = c * C + tl.arange(0, C)
    t_mask = offs_t < seq
    offs_k = i_k * BK + tl.arange(0, BK)
    k_mask = offs_k < dim_k
    v_base = V + b * stride_vb + h * stride_vh + offs_t[:, None] * stride_vs
    do_base = DO + b * stride_vb + h * stride_vh + offs_t[:, None] * stride_vs
    hs_off = (bh.to(tl.int64) * n_chunks + c) * dim_k * dim_v + offs_k[None, :] * dim_v
    dp = tl.zeros([C, C], dtype=tl.float32)
    dq_inter = tl.zeros([C, BK], dtype=tl.float32)
    dk_inter = tl.zeros([C, BK], dtype=tl.float32)
    for v0 in range(0, dim_v, BV):
        offs_v = v0 + tl.arange(0, BV)
        v_mask = offs_v < dim_v
        tv_mask = t_mask[:, None] & v_mask[None, :]
        v = tl.load(v_base + offs_v[None, :], mask=tv_mask, other=0.0)
        do = tl.load(do_base + offs_v[None, :], mask=tv_mask, other=0.0)
        vk_mask = v_mask[:, None] & k_mask[None, :]
        hs_t = tl.load(HS + hs_off + offs_v[:, None], mask=vk_mask, other=0.0).to(v.dtype)  # (BV, BK)
        dhs_t = tl.load(DHS + hs_off + offs_v[:, None], mask=vk_mask, other=0.0).to(v.dtype)
        dp += tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        dq_inter += tl.dot(do, hs_t, input_precision=DOT_PREC)
        dk_inter += tl.dot(v, dhs_t, input_precision=DOT_PREC)
    if HAS_SEGMENTS:
        run, run_prev, run_end, G, G_end = _chunk_runs_decay(
            RUNS + b * (seq + 1), c, seq, G_LOG + b * stride_gb + h, offs_t * stride_gs,
            HAS_DECAY, C)
    else:
        G, G_end = _chunk_decay(G_LOG + b * stride_gb + h, offs_t * stride_gs, t_mask,
                                HAS_DECAY, C)
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    if HAS_SEGMENTS:
        causal = causal & (run[:, None] == run[None, :])
    dp = dp * tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
    qk_mask = t_mask[:, None] & k_mask[None, :]
    qk_off = (b * stride_qb + (h // qk_group) * stride_qh + offs_t[:, None] * stride_qs
              + offs_k[None, :])
    d_off = b * stride_db + h * stride_dh + offs_t[:, None] * stride_ds + offs_k[None, :]
    q = tl.load(Q + qk_off, mask=qk_mask, other=0.0)
    k = tl.load(K + qk_off, mask=qk_mask, other=0.0)
    dp_lo = dp.to(q.dtype)
    dq = tl.dot(dp_lo, k, input_precision=DOT_PREC)
    to_q = tl.exp(G)
    if HAS_SEGMENTS:
        to_q = tl.where(run == run_prev, to_q, 0.0)
    dq = (dq + dq_inter * to_q[:, None]) * scale
    dk = tl.dot(tl.trans(dp_lo), q, input_precision=DOT_PREC) * scale
    to_end = tl.exp(G_end - G)
    if HAS_SEGMENTS:
        to_end = tl.where(run == run_end, to_end, 0.0)
    dk = dk + dk_inter * to_end[:, None]
    tl.store(DQ + d_off, dq.to(DQ.dtype.element_ty), mask=qk_mask)
    tl.store(DK + d_off, dk.to(DK.dtype.element_ty), mask=qk_mask)
    if HAS_DECAY:
        dg = tl.sum(q.to(tl.float32) * dq - k.to(tl.float32) * dk, 1)
        tl.store(DG_PART + i_k * stride_dg_part + b * stride_gb + offs_t * stride_gs + h, dg,
                 mask=t_mask)


@triton.jit
def _la_bwd_dv_kernel(Q, K, DO, G_LOG, DHS, DV, RUNS,
                      stride_qb, stride_qs, stride_qh, stride_vb, stride_vs, stride_vh,
                      stride_gb, stride_gs, num_heads, qk_group, seq, dim_k, dim_v, n_chunks,
                      scale, HAS_DECAY: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                      C: tl.constexpr, BK: tl.constexpr,
                      BV: tl.constexpr, DOT_PREC: tl.constexpr):
    """One chunk's dv for one dim_v block: scale ((K Qᵀ) ⊙ Dᵀ) dO + (e^{G_C − G} ⊙ K) dS_c."""
    i_v, c, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_t = c * C + tl.arange(0, C)
    t_mask = offs_t < seq
    offs_v = i_v * BV + tl.arange(0, BV)
    v_mask = offs_v < dim_v
    if HAS_SEGMENTS:
        run, run_prev, run_end, G, G_end = _chunk_runs_decay(
            RUNS + b * (seq + 1), c, seq, G_LOG + b * stride_gb + h, offs_t * stride_gs,
            HAS_DECAY, C)
    else:
        G, G_end = _chunk_decay(G_LOG + b * stride_gb + h, offs_t * stride_gs, t_mask,
                                HAS_DECAY, C)
    to_end = tl.exp(G_end - G)
    if HAS_SEGMENTS:
        to_end = tl.where(run == run_end, to_end, 0.0)
    hq = h // qk_group
    q_base = Q + b * stride_qb + hq * stride_qh + offs_t[:, None] * stride_qs
    k_base = K + b * stride_qb + hq * stride_qh + offs_t[:, None] * stride_qs
    dhs_base = DHS + (bh.to(tl.int64) * n_chunks + c) * dim_k * dim_v + offs_v[None, :]
    s_t = tl.zeros([C, C], dtype=tl.float32)  # [j, i] = k_j · q_i
    dv = tl.zeros([C, BV], dtype=tl.float32)
    for k0 in range(0, dim_k, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < dim_k
        q = tl.load(q_base + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        k = tl.load(k_base + offs_k[None, :], mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        dhs = tl.load(dhs_base + offs_k[:, None] * dim_v, mask=k_mask[:, None] & v_mask[None, :],
                      other=0.0).to(k.dtype)
        s_t += tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
        k_dec = (k.to(tl.float32) * to_end[:, None]).to(k.dtype)
        dv += tl.dot(k_dec, dhs, input_precision=DOT_PREC)
    causal_t = tl.arange(0, C)[:, None] <= tl.arange(0, C)[None, :]  # [j, i]: j <= i
    if HAS_SEGMENTS:
        causal_t = causal_t & (run[:, None] == run[None, :])
    s_t = s_t * tl.exp(tl.where(causal_t, G[None, :] - G[:, None], float("-inf")))
    tv_mask = t_mask[:, None] & v_mask[None, :]
    tv_off = b * stride_vb + h * stride_vh + offs_t[:, None] * stride_vs + offs_v[None, :]
    do = tl.load(DO + tv_off, mask=tv_mask, other=0.0)
    dv += tl.dot(s_t.to(do.dtype), do, input_precision=DOT_PREC) * scale
    tl.store(DV + tv_off, dv.to(DV.dtype.element_ty), mask=tv_mask)


# ------------------------------------------------------------------ launch configuration
CHUNK = 64  # tokens per chunk on CUDA (the interpreter uses 16 so that chunk splits are tested)
_SEQ_BLOCKS = [(32, 32, 2, 2), (32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2)]
_PAR_BLOCKS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 128, 8, 2), (128, 128, 8, 2)]


def _configs(blocks):
    return [triton.Config({"BK": bk, "BV": bv}, num_warps=w, num_stages=s) for bk, bv, w, s in blocks]


def _prune(configs, named_args, **kwargs):
    """Blocks no wider than the padded dims (a 128 block over dim 64 only adds masked lanes)."""
    pk = max(16, triton.next_power_of_2(named_args["dim_k"]))
    pv = max(16, triton.next_power_of_2(named_args["dim_v"]))
    kept = [c for c in configs if c.kwargs["BK"] <= pk and c.kwargs["BV"] <= pv]
    return kept or [min(configs, key=lambda c: c.kwargs["BK"] * c.kwargs["BV"])]


def _tuned(kernel, blocks, reset=()):
    return triton.autotune(_configs(blocks), key=["dim_k", "dim_v", "seq"], reset_to_zero=list(reset),
                           prune_configs_by={"early_config_prune": _prune})(kernel)


_sweep_tuned = _tuned(_la_sweep_kernel, _SEQ_BLOCKS)
_out_tuned = _tuned(_la_out_kernel, _PAR_BLOCKS)
_dqdk_tuned = _tuned(_la_bwd_dqdk_kernel, _PAR_BLOCKS, reset=("DG_PART",))
_dv_tuned = _tuned(_la_bwd_dv_kernel, _PAR_BLOCKS)
_MIN_BK = min(bk for bk, *_ in _PAR_BLOCKS)


def _chunk() -> int:
    return 16 if INTERPRET else CHUNK


_INTERPRET_META = {"BK": 16, "BV": 16, "num_warps": 1}


def _launch(kernel, tuned, grid_fn, *args, **kwargs):
    launch(kernel, tuned, grid_fn, _INTERPRET_META, *args, **kwargs)


def _state_dtype(dtype: torch.dtype) -> torch.dtype:
    """Per-chunk states are stored in bfloat16 for bfloat16 inputs (their dot products read them
    in bfloat16 anyway); float16 could overflow on long sequences, so it gets float32."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.float32


def _sweep(a, b_, g, init, runs, n_chunks, C, *, reverse, store_final, scale=1.0):
    """Run the sweep kernel: returns (per-chunk states (b·h, n_chunks, dk, dv), final (b, h, dk,
    dv) float32). Forward: a, b_ = k, v and init = S0; reverse: q, dO and the final-state grad.
    runs: `runs_with_previous(segments)` `(b, n + 1)` int32, or None."""
    bsz, n, _, dk = a.shape
    h, dv = b_.shape[2], b_.shape[-1]
    states = torch.empty(bsz * h, n_chunks, dk, dv, dtype=_state_dtype(a.dtype), device=a.device)
    final = torch.empty(bsz, h, dk, dv, dtype=torch.float32, device=a.device)
    grid = lambda m: (triton.cdiv(dk, m["BK"]), triton.cdiv(dv, m["BV"]), bsz * h)
    _launch(_la_sweep_kernel, _sweep_tuned, grid, a, b_, g if g is not None else final,
            init if init is not None else final, states, final, runs, *_strides(a, b_), h,
            h // a.shape[2], n, dk, dv, n_chunks, float(scale), HAS_DECAY=g is not None,
            HAS_SEGMENTS=runs is not None, HAS_INIT=init is not None,
            STORE_FINAL=store_final, REVERSE=reverse, C=C, DOT_PREC=dot_precision(a.dtype))
    return states, final


def _strides(q, v):
    """q/k strides, v (and o, dO, dv) strides, and those of the (b, n, h) log decay."""
    b, n, h, _ = v.shape
    return (q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2), n * h, h)


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, runs, scale, want_final):
        b, n, hk, dk = q.shape
        h, dv = v.shape[2], v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        C = _chunk()
        n_chunks = triton.cdiv(n, C)
        hs, s_out = _sweep(k, v, g, s0, runs, n_chunks, C, reverse=False, store_final=True)
        o = torch.empty(b, n, h, dv, dtype=q.dtype, device=q.device)
        grid = lambda m: (triton.cdiv(dv, m["BV"]), n_chunks, b * h)
        _launch(_la_out_kernel, _out_tuned, grid, q, k, v, g if g is not None else s_out, hs, o,
                runs, *_strides(q, v), h, h // hk, n, dk, dv, n_chunks, float(scale),
                HAS_DECAY=g is not None, HAS_SEGMENTS=runs is not None, C=C,
                DOT_PREC=dot_precision(q.dtype))
        ctx.save_for_backward(q, k, v, g, s0, s_out, runs)
        ctx.scale = scale
        return o, s_out

    @staticmethod
    def backward(ctx, do, ds_final):
        q, k, v, g, s0, s_final, runs = ctx.saved_tensors
        scale = float(ctx.scale)
        b, n, hk, dk = q.shape
        h, dv_dim = v.shape[2], v.shape[-1]
        r = h // hk
        do = do.contiguous().to(q.dtype)
        C = _chunk()
        n_chunks = triton.cdiv(n, C)
        prec = dot_precision(q.dtype)
        # the entering states are recomputed (one sweep) rather than kept from the forward
        hs, _ = _sweep(k, v, g, s0, runs, n_chunks, C, reverse=False, store_final=False)
        dsf = ds_final.contiguous().float() if ds_final is not None else None
        dhs, ds0 = _sweep(q, do, g, dsf, runs, n_chunks, C, reverse=True, store_final=True,
                          scale=scale)
        flags = dict(HAS_DECAY=g is not None, HAS_SEGMENTS=runs is not None, C=C, DOT_PREC=prec)
        g_t = g if g is not None else ds0
        strides = _strides(q, v)
        # grouped q/k: each head's share in float32, summed over the group below
        dq, dk_ = (torch.empty(b, n, h, dk, dtype=q.dtype if r == 1 else torch.float32,
                               device=q.device) for _ in range(2))
        dv = torch.empty_like(v)
        nk_max = triton.cdiv(dk, _INTERPRET_META["BK"] if INTERPRET else _MIN_BK)
        # its own buffer even without decay: the autotuner zeroes DG_PART before timing configs,
        # so a stand-in must not alias a result (ds0 did: d initial_state came back zero)
        dg_part = torch.zeros(nk_max if g is not None else 1, b, n if g is not None else 1, h,
                              dtype=torch.float32, device=q.device)
        _launch(_la_bwd_dqdk_kernel, _dqdk_tuned,
                lambda m: (triton.cdiv(dk, m["BK"]), n_chunks, b * h),
                q, k, v, do, g_t, hs, dhs, dq, dk_, dg_part, runs, *strides,
                dg_part.stride(0) if g is not None else 0, *dq.stride()[:3], h, r, n, dk, dv_dim,
                n_chunks, scale, **flags)
        _launch(_la_bwd_dv_kernel, _dv_tuned,
                lambda m: (triton.cdiv(dv_dim, m["BV"]), n_chunks, b * h),
                q, k, do, g_t, dhs, dv, runs, *strides, h, r, n, dk, dv_dim, n_chunks, scale,
                **flags)
        dg = None  # with segments too: a masked pair adds to neither q·dq nor k·dk
        if g is not None and ctx.needs_input_grad[3]:
            dG = dg_part.sum(0)  # (b, n, h): q·dq − k·dk
            if ds_final is not None:
                dG[:, -1] += (ds_final.float() * s_final).sum((-1, -2))
            dg = dG.flip(1).cumsum(1).flip(1)
        ds0_out = ds0 if s0 is not None else None
        if r > 1:
            dq, dk_ = (t.view(b, n, hk, r, dk).sum(3).to(q.dtype) for t in (dq, dk_))
        return dq, dk_, dv, dg, ds0_out, None, None, None


def supports(q, k, v, *, log_decay=None, scale=None, initial_state=None,
             return_final_state=False, segments=None) -> bool:
    """Whether the Triton kernel runs these inputs (else the dispatcher uses the chunked path)."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:2] != q.shape[:2]:
        return False
    if not valid_segments(segments, q.shape[0], q.shape[1], q.device):
        return False
    if q.shape[2] < 1 or v.shape[2] % q.shape[2]:
        return False
    on_device = triton_runnable(q.device)
    dtypes = (torch.float16, torch.bfloat16, torch.float32) if q.device.type != "cpu" else (
        torch.float16, torch.float32)
    return (
        on_device
        and q.dtype in dtypes
        and q.dtype == k.dtype == v.dtype
        and q.shape[-1] <= MAX_DIM
        and v.shape[-1] <= MAX_DIM
        and q.shape[1] > 0
        and (log_decay is None or log_decay.dtype in (torch.float32, torch.float16, torch.bfloat16))
    )


def linear_attention(q, k, v, *, log_decay=None, scale=None, initial_state=None,
                     return_final_state=False, segments=None):
    """Causal linear attention with optional decay (see the module docstring). q, k `(b, n, hk,
    dk)` with hk dividing h (grouped q/k), v `(b, n, h, dv)`, log_decay `(b, n, h)` / `(h,)` / None, initial_state `(b, h, dk, dv)`,
    segments `(b, n)` int32/int64 document ids or None (the state resets where the id changes).
    Returns o `(b, n, h, dv)` in q.dtype, or `(o, final_state float32)`."""
    from ctxscale.kernels.linear_attention import _check_inputs

    _check_inputs(q, k, v, log_decay, initial_state, segments)
    if not supports(q, k, v, log_decay=log_decay, initial_state=initial_state):
        raise ValueError(
            f"the Triton linear attention does not support q {tuple(q.shape)} {q.dtype} on "
            f"{q.device} (needs float16/float32 (bfloat16 on CUDA), dims <= {MAX_DIM}, CUDA or "
            "TRITON_INTERPRET=1); use kernels.linear_attention instead"
        )
    b, n, _, dk = q.shape
    h = v.shape[2]
    scale = dk ** -0.5 if scale is None else float(scale)
    g = None
    if log_decay is not None:
        g = log_decay.view(1, 1, h).expand(b, n, h) if log_decay.dim() == 1 else log_decay
        g = g.float().contiguous()
    s0 = initial_state.float().contiguous() if initial_state is not None else None
    runs = runs_with_previous(segments).contiguous() if segments is not None else None
    o, s_final = _LinearAttention.apply(q, k, v, g, s0, runs, scale, return_final_state)
    return (o, s_final) if return_final_state else o


__all__ = ["supports", "linear_attention"]
