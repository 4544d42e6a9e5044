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
One program per (dim_v block, dim_k block, batch·head) walks the chunks in order keeping its
(BK, BV) block of the state in registers (the "fused chunk" schedule); products that need all of
dim_k (or dim_v) are partial per block and summed afterwards.

Layout: q, k `(batch, seq, heads, dim_k)`, v `(batch, seq, heads, dim_v)`, log_decay `(batch, seq,
heads)`, `(heads,)` or None, states `(batch, heads, dim_k, dim_v)` float32; scale defaults to
dim_k ** -0.5. Reference and dispatcher: `kernels/linear_attention.py`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ctxscale.kernels.dispatch import triton_runnable

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
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
def _la_fwd_kernel(Q, K, V, G_LOG, S0, O_PART, S_OUT,
                   stride_qb, stride_qs, stride_qh, stride_vb, stride_vs, stride_vh,
                   stride_gb, stride_gs, stride_part,
                   num_heads, seq, dim_k, dim_v, scale,
                   HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr, STORE_FINAL: tl.constexpr,
                   C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_k, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_mask = offs_k < dim_k
    v_mask = offs_v < dim_v
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    state_off = bh.to(tl.int64) * dim_k * dim_v + offs_k[:, None] * dim_v + offs_v[None, :]
    kv_mask = k_mask[:, None] & v_mask[None, :]
    if HAS_S0:
        S = tl.load(S0 + state_off, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_qb + h * stride_qh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O_PART + i_k.to(tl.int64) * stride_part + b * stride_vb + h * stride_vh
    g_base = G_LOG + b * stride_gb + h
    for t0 in range(0, seq, C):
        offs_t = t0 + tl.arange(0, C)
        t_mask = offs_t < seq
        qk_mask = t_mask[:, None] & k_mask[None, :]
        tv_mask = t_mask[:, None] & v_mask[None, :]
        q = tl.load(q_base + offs_t[:, None] * stride_qs + offs_k[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        k = tl.load(k_base + offs_t[:, None] * stride_qs + offs_k[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + offs_t[:, None] * stride_vs + offs_v[None, :], mask=tv_mask, other=0.0).to(tl.float32)
        G, G_end = _chunk_decay(g_base, offs_t * stride_gs, t_mask, HAS_DECAY, C)
        decay = tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
        scores = tl.dot(q, tl.trans(k), input_precision="ieee") * decay
        o = tl.dot(scores, v, input_precision="ieee")
        o += tl.dot(q * tl.exp(G)[:, None], S, input_precision="ieee")
        tl.store(o_base + offs_t[:, None] * stride_vs + offs_v[None, :], o * scale, mask=tv_mask)
        k_dec = k * tl.exp(G_end - G)[:, None]
        S = S * tl.exp(G_end) + tl.dot(tl.trans(k_dec), v, input_precision="ieee")
    if STORE_FINAL:
        tl.store(S_OUT + state_off, S, mask=kv_mask)


@triton.jit
def _la_bwd_dq_kernel(K, V, DO, G_LOG, S0, DQ_PART,
                      stride_qb, stride_qs, stride_qh, stride_vb, stride_vs, stride_vh,
                      stride_gb, stride_gs, stride_part,
                      num_heads, seq, dim_k, dim_v, scale,
                      HAS_DECAY: tl.constexpr, HAS_S0: tl.constexpr,
                      C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_k, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_mask = offs_k < dim_k
    v_mask = offs_v < dim_v
    causal = tl.arange(0, C)[:, None] >= tl.arange(0, C)[None, :]
    kv_mask = k_mask[:, None] & v_mask[None, :]
    if HAS_S0:
        state_off = bh.to(tl.int64) * dim_k * dim_v + offs_k[:, None] * dim_v + offs_v[None, :]
        S = tl.load(S0 + state_off, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        S = tl.zeros([BK, BV], dtype=tl.float32)
    k_base = K + b * stride_qb + h * stride_qh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DO + b * stride_vb + h * stride_vh
    dq_base = DQ_PART + i_v.to(tl.int64) * stride_part + b * stride_qb + h * stride_qh
    g_base = G_LOG + b * stride_gb + h
    for t0 in range(0, seq, C):
        offs_t = t0 + tl.arange(0, C)
        t_mask = offs_t < seq
        qk_mask = t_mask[:, None] & k_mask[None, :]
        tv_mask = t_mask[:, None] & v_mask[None, :]
        k = tl.load(k_base + offs_t[:, None] * stride_qs + offs_k[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + offs_t[:, None] * stride_vs + offs_v[None, :], mask=tv_mask, other=0.0).to(tl.float32)
        do = tl.load(do_base + offs_t[:, None] * stride_vs + offs_v[None, :], mask=tv_mask, other=0.0).to(tl.float32)
        G, G_end = _chunk_decay(g_base, offs_t * stride_gs, t_mask, HAS_DECAY, C)
        decay = tl.exp(tl.where(causal, G[:, None] - G[None, :], float("-inf")))
        dp = tl.dot(do, tl.trans(v), input_precision="ieee") * decay
        dq = tl.dot(dp, k, input_precision="ieee")
        dq += tl.dot(do, tl.trans(S), input_precision="ieee") * tl.exp(G)[:, None]
        tl.store(dq_base + offs_t[:, None] * stride_qs + offs_k[None, :], dq * scale, mask=qk_mask)
        S = S * tl.exp(G_end) + tl.dot(tl.trans(k * tl.exp(G_end - G)[:, None]), v, input_precision="ieee")


@triton.jit
def _la_bwd_dkdv_kernel(Q, K, V, DO, G_LOG, DS_FINAL, DK_PART, DV_PART, DS0,
                        stride_qb, stride_qs, stride_qh, stride_vb, stride_vs, stride_vh,
                        stride_gb, stride_gs, stride_dk_part, stride_dv_part,
                        num_heads, seq, dim_k, dim_v, scale,
                        HAS_DECAY: tl.constexpr, HAS_DS_FINAL: tl.constexpr,
                        C: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    i_v, i_k, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_k = i_k * BK + tl.arange(0, BK)
    offs_v = i_v * BV + tl.arange(0, BV)
    k_mask = offs_k < dim_k
    v_mask = offs_v < dim_v
    causal_t = tl.arange(0, C)[:, None] <= tl.arange(0, C)[None, :]  # [j, i]: j <= i
    kv_mask = k_mask[:, None] & v_mask[None, :]
    state_off = bh.to(tl.int64) * dim_k * dim_v + offs_k[:, None] * dim_v + offs_v[None, :]
    if HAS_DS_FINAL:
        dS = tl.load(DS_FINAL + state_off, mask=kv_mask, other=0.0).to(tl.float32)
    else:
        dS = tl.zeros([BK, BV], dtype=tl.float32)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_qb + h * stride_qh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DO + b * stride_vb + h * stride_vh
    dk_base = DK_PART + i_v.to(tl.int64) * stride_dk_part + b * stride_qb + h * stride_qh
    dv_base = DV_PART + i_k.to(tl.int64) * stride_dv_part + b * stride_vb + h * stride_vh
    g_base = G_LOG + b * stride_gb + h
    n_chunks = tl.cdiv(seq, C)
    for c in range(n_chunks):
        t0 = (n_chunks - 1 - c) * C
        offs_t = t0 + tl.arange(0, C)
        t_mask = offs_t < seq
        qk_mask = t_mask[:, None] & k_mask[None, :]
        tv_mask = t_mask[:, None] & v_mask[None, :]
        q = tl.load(q_base + offs_t[:, None] * stride_qs + offs_k[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        k = tl.load(k_base + offs_t[:, None] * stride_qs + offs_k[None, :], mask=qk_mask, other=0.0).to(tl.float32)
        v = tl.load(v_base + offs_t[:, None] * stride_vs + offs_v[None, :], mask=tv_mask, other=0.0).to(tl.float32)
        do = tl.load(do_base + offs_t[:, None] * stride_vs + offs_v[None, :], mask=tv_mask, other=0.0).to(tl.float32)
        G, G_end = _chunk_decay(g_base, offs_t * stride_gs, t_mask, HAS_DECAY, C)
        decay_t = tl.exp(tl.where(causal_t, G[None, :] - G[:, None], float("-inf")))  # [j, i]
        to_end = tl.exp(G_end - G)
        s_t = tl.dot(k, tl.trans(q), input_precision="ieee") * decay_t
        dv = tl.dot(s_t, do, input_precision="ieee") * scale
        dv += tl.dot(k * to_end[:, None], dS, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee") * decay_t
        dk = tl.dot(dp_t, q, input_precision="ieee") * scale
        dk += tl.dot(v, tl.trans(dS), input_precision="ieee") * to_end[:, None]
        tl.store(dk_base + offs_t[:, None] * stride_qs + offs_k[None, :], dk, mask=qk_mask)
        tl.store(dv_base + offs_t[:, None] * stride_vs + offs_v[None, :], dv, mask=tv_mask)
        q_dec = q * tl.exp(G)[:, None]
        dS = dS * tl.exp(G_end) + tl.dot(tl.trans(q_dec), do, input_precision="ieee") * scale
    tl.store(DS0 + state_off, dS, mask=kv_mask)


def _blocks(dim_k: int, dim_v: int):
    """(chunk, BK, BV, num_warps). The interpreter uses 16-wide blocks so block splits are tested."""
    if _INTERPRET:
        return 16, 16, 16, 1
    bk = min(64, max(16, triton.next_power_of_2(dim_k)))
    bv = min(64, max(16, triton.next_power_of_2(dim_v)))
    return 64, bk, bv, 4


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, g, s0, scale, want_final):
        b, n, h, dk = q.shape
        dv = v.shape[-1]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        C, BK, BV, warps = _blocks(dk, dv)
        nk, nv = triton.cdiv(dk, BK), triton.cdiv(dv, BV)
        o_part = torch.empty((nk, b, n, h, dv), dtype=torch.float32, device=q.device)
        s_out = torch.empty((b, h, dk, dv), dtype=torch.float32, device=q.device)
        g_t = g.contiguous() if g is not None else o_part  # (b, n, h) float32, or unused
        s0_t = s0.contiguous() if s0 is not None else s_out
        _la_fwd_kernel[(nv, nk, b * h)](
            q, k, v, g_t, s0_t, o_part, s_out,
            q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
            n * h, h, o_part.stride(0), h, n, dk, dv, float(scale),
            HAS_DECAY=g is not None, HAS_S0=s0 is not None, STORE_FINAL=True,
            C=C, BK=BK, BV=BV, num_warps=warps)
        o = o_part.sum(0).to(q.dtype)
        ctx.save_for_backward(q, k, v, g, s0, s_out)
        ctx.scale = scale
        return o, s_out

    @staticmethod
    def backward(ctx, do, ds_final):
        q, k, v, g, s0, s_final = ctx.saved_tensors
        scale = ctx.scale
        b, n, h, dk = q.shape
        dv_dim = v.shape[-1]
        do = do.contiguous()
        C, BK, BV, warps = _blocks(dk, dv_dim)
        nk, nv = triton.cdiv(dk, BK), triton.cdiv(dv_dim, BV)
        dq_part = torch.empty((nv, b, n, h, dk), dtype=torch.float32, device=q.device)
        dk_part = torch.empty_like(dq_part)
        dv_part = torch.empty((nk, b, n, h, dv_dim), dtype=torch.float32, device=q.device)
        ds0 = torch.empty((b, h, dk, dv_dim), dtype=torch.float32, device=q.device)
        g_t = g.contiguous() if g is not None else ds0
        s0_t = s0.contiguous() if s0 is not None else ds0
        dsf = ds_final.contiguous().float() if ds_final is not None else ds0
        strides = (q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
                   n * h, h)
        grid = (nv, nk, b * h)
        _la_bwd_dq_kernel[grid](
            k, v, do, g_t, s0_t, dq_part, *strides, dq_part.stride(0), h, n, dk, dv_dim,
            float(scale), HAS_DECAY=g is not None, HAS_S0=s0 is not None,
            C=C, BK=BK, BV=BV, num_warps=warps)
        _la_bwd_dkdv_kernel[grid](
            q, k, v, do, g_t, dsf, dk_part, dv_part, ds0, *strides, dk_part.stride(0),
            dv_part.stride(0), h, n, dk, dv_dim, float(scale),
            HAS_DECAY=g is not None, HAS_DS_FINAL=ds_final is not None,
            C=C, BK=BK, BV=BV, num_warps=warps)
        dq, dk_, dv = dq_part.sum(0), dk_part.sum(0), dv_part.sum(0)
        dg = None
        if g is not None and ctx.needs_input_grad[3]:
            dG = (q.float() * dq).sum(-1) - (k.float() * dk_).sum(-1)  # (b, n, h)
            if ds_final is not None:
                dG[:, -1] += (ds_final.float() * s_final).sum((-1, -2))
            dg = dG.flip(1).cumsum(1).flip(1)
        ds0_out = ds0 if s0 is not None else None
        return dq.to(q.dtype), dk_.to(k.dtype), dv.to(v.dtype), dg, ds0_out, None, None


def supports(q, k, v, *, log_decay=None, scale=None, initial_state=None,
             return_final_state=False) -> bool:
    """Whether the Triton kernel runs these inputs (else the dispatcher uses the chunked path)."""
    if q.dim() != 4 or k.shape != q.shape or v.dim() != 4 or v.shape[:3] != q.shape[:3]:
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
                     return_final_state=False):
    """Causal linear attention with optional decay (see the module docstring). q, k `(b, n, h,
    dk)`, v `(b, n, h, dv)`, log_decay `(b, n, h)` / `(h,)` / None, initial_state `(b, h, dk, dv)`.
    Returns o `(b, n, h, dv)` in q.dtype, or `(o, final_state float32)`."""
    from ctxscale.kernels.linear_attention import _check_inputs

    _check_inputs(q, k, v, log_decay, initial_state)
    if not supports(q, k, v, log_decay=log_decay, initial_state=initial_state):
        raise ValueError(
            f"the Triton linear attention does not support q {tuple(q.shape)} {q.dtype} on "
            f"{q.device} (needs float16/float32 (bfloat16 on CUDA), dims <= {MAX_DIM}, CUDA or "
            "TRITON_INTERPRET=1); use kernels.linear_attention instead"
        )
    b, n, h, dk = q.shape
    scale = dk ** -0.5 if scale is None else float(scale)
    g = None
    if log_decay is not None:
        g = log_decay.view(1, 1, h).expand(b, n, h) if log_decay.dim() == 1 else log_decay
        g = g.float()
    s0 = initial_state.float() if initial_state is not None else None
    o, s_final = _LinearAttention.apply(q, k, v, g, s0, scale, return_final_state)
    return (o, s_final) if return_final_state else o


__all__ = ["supports", "linear_attention"]
