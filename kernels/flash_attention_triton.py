"""FlashAttention-2 in Triton: forward, backward, and the block-merge entry points of ring attention.

Paper: Tri Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work
Partitioning" (2023), after Dao et al., "FlashAttention" (2022).

Math (per batch b, query head h, key/value head h_kv = h // (heads / kv_heads)):

    s_ij = scale · q_i · k_j,   lse_i = log Σ_j exp(s_ij),   o_i = Σ_j exp(s_ij − lse_i) v_j

Forward: one program owns BLOCK_M query rows and walks the key tiles with an online softmax
(running max m, running sum l, un-normalized accumulator), in base 2 (`exp2`, the scale folded
with log2 e). Key tiles that are fully visible run without masks; only the causal diagonal and the
ragged last tile are masked. Backward (recomputation, no stored probabilities): a pre-pass forms
`D_i = do_i · o_i − dlse_i`; a key-major kernel owns BLOCK_N keys of one key/value head and loops
over the query heads of its group and the query tiles that see them, accumulating dk and dv in
registers (no atomics, GQA without repeating k/v); a query-major kernel accumulates dq. As in the
forward, only the tiles that straddle the causal diagonal are masked. With
p_ij = exp(s_ij − lse_i): dv_j = Σ_i p_ij do_i, ds_ij = p_ij (do_i · v_j − D_i),
dq_i = scale Σ_j ds_ij k_j, dk_j = scale Σ_i ds_ij q_i.

Layout: q `(batch, seq_q, heads, head_dim)`, k/v `(batch, seq_k, kv_heads, head_dim)`, lse float32
`(batch, heads, seq_q)`. Causal masks are bottom-right aligned as in flash-attn >= 2.1 (query i
sees key j iff j <= i + seq_k − seq_q); a row that sees no key gets o = 0, lse = −inf. head_dim is
padded to the next power of two (>= 16) by masked loads; the default scale uses the true dim.

Ring / LightSeq steps use `flash_attention_forward(..., o_prev=, lse_prev=, inplace=True)`, which
merges the new key block into the running (o, lse) exactly, inside the kernel and in place (each
program reads its rows of o_prev/lse_prev before it writes them; they may be row-slice views):
lse = logaddexp(lse_prev, lse_blk), o = e^{lse_prev − lse} o_prev + e^{lse_blk − lse} o_blk; and
`flash_attention_backward` accepts the GLOBAL o and lse, returning this key block's contribution
to (dq, dk, dv), or adding it into the caller's running sums in place (`accumulate_into`). The
autotuner restores every buffer a kernel may read back (`restore_value`), so the timed runs of
the first call per shape leave no trace.

On CUDA the tile sizes come from a small `triton.autotune` sweep (configs whose tiles would not
fit the device's shared memory are pruned first; causal query tiles run last-first, the longest
first, as in flash-attn); under the CPU interpreter
(`TRITON_INTERPRET=1`, read when this module is imported) fixed 16 x 16 tiles keep tests fast
(`INTERPRET_TILES`; the tests also run unequal tiles, whose diagonal bounds differ).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ctxscale.kernels.attention import _check_shapes
from ctxscale.kernels.dispatch import shared_memory_per_block, triton_runnable
from ctxscale.kernels.triton_launch import INTERPRET, dot_precision, launch

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _fwd_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3),
                             (128, 128, 8, 2)]
    ]


def _bwd_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
        for bm, bn, w, s in [(64, 64, 4, 2), (32, 128, 8, 2), (64, 128, 8, 2), (32, 64, 4, 3)]
    ]


def _tile_smem(kind: str, bm: int, bn: int, stages: int, d: int, elem: int) -> int:
    """Shared memory of one program (bytes), as Triton lays the tiles out: the tiles a loop
    streams are buffered `stages` deep (forward: k, v; dk/dv: q, do; dq: k, v), the ones a
    program keeps are staged once. Matches the compiled sizes in
    benchmarks/results/kernels_sm90_compile.md to within 1 KiB."""
    if kind == "fwd":
        tiles = bm + 2 * stages * bn
    elif kind == "dkdv":
        tiles = 2 * stages * bm + 2 * bn
    else:
        tiles = 2 * bm + 2 * stages * bn
    return tiles * d * elem


def _pruner(kind: str):
    def prune(configs, named_args, **kwargs):
        """Drop the configs whose tiles would not fit the device's shared memory."""
        q = named_args["Q"]
        d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 64))
        limit = shared_memory_per_block(q.device)
        kept = [c for c in configs if _tile_smem(kind, c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"],
                                                 c.num_stages, d, q.element_size()) <= limit]
        return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


@triton.jit
def _fwd_tile_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, lo, hi,
                   seq_k, offset, head_dim, qk_scale,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_mask = (cols < seq_k)[:, None] & d_mask[None, :]
        k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 domain
        if MASKED:
            visible = (cols < seq_k)[None, :]
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, O_PREV, LSE_PREV,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                stride_pb, stride_ps, stride_ph, stride_lb, stride_lh, stride_ls,
                num_heads, group, seq_q, seq_k, head_dim, qk_scale,
                CAUSAL: tl.constexpr, HAS_PREV: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    start_m = tl.program_id(0)
    if CAUSAL:  # the last query tiles see the most keys: schedule them first
        start_m = tl.num_programs(0) - 1 - start_m
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hk = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_q
    d_mask = offs_d < head_dim
    q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    offset = seq_k - seq_q
    if CAUSAL:
        # keys [0, full_hi) are visible to every row of this tile; [full_hi, hi) need the mask
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + offset)
        full_hi = tl.minimum(seq_k, start_m * BLOCK_M + offset + 1)
    else:
        hi = seq_k
        full_hi = seq_k
    full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_tile_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                   offs_m, 0, full_hi, seq_k, offset, head_dim, qk_scale,
                                   False, CAUSAL, BLOCK_N, BLOCK_D, DOT_PREC)
    acc, l_i, m_i = _fwd_tile_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                   offs_m, full_hi, hi, seq_k, offset, head_dim, qk_scale,
                                   True, CAUSAL, BLOCK_N, BLOCK_D, DOT_PREC)

    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    # LSE and LSE_PREV share strides (the same tensor when merging in place)
    lse_off = b * stride_lb + h * stride_lh + offs_m * stride_ls
    lse_ptrs = LSE + lse_off
    if HAS_PREV:  # read before the stores below: Out/LSE may be O_PREV/LSE_PREV (in place)
        lse_p = tl.load(LSE_PREV + lse_off, mask=m_mask, other=float("-inf"))
        p_ptrs = O_PREV + b * stride_pb + h * stride_ph + offs_m[:, None] * stride_ps + offs_d[None, :]
        o_p = tl.load(p_ptrs, mask=m_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        lse_max = tl.maximum(lse_p, lse)
        none = lse_max == float("-inf")
        lse_max = tl.where(none, 0.0, lse_max)
        w_p = tl.exp(lse_p - lse_max)
        w_c = tl.exp(lse - lse_max)
        total = w_p + w_c
        o = (o_p * w_p[:, None] + o * w_c[:, None]) / tl.where(none, 1.0, total)[:, None]
        lse = tl.where(none, float("-inf"), lse_max + tl.log(tl.where(none, 1.0, total)))
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, o.to(Out.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])
    tl.store(lse_ptrs, lse, mask=m_mask)


@triton.jit
def _bwd_delta_kernel(Out, DO, DLSE, DELTA, stride_ob, stride_os, stride_oh,
                      stride_db, stride_ds, stride_dh, num_heads, seq_q, head_dim,
                      HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    start_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seq_q)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    row = bh.to(tl.int64) * seq_q + offs_m
    if HAS_DLSE:
        delta -= tl.load(DLSE + row, mask=offs_m < seq_q, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < seq_q)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, row_base, LSE, DELTA, stride_qs, stride_ds,
                    offs_n, lo, hi, seq_q, head_dim, offset, qk_scale,
                    MASKED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PREC: tl.constexpr):
    """dk, dv of one key block over the query tiles [lo, hi). Only causal-diagonal tiles need
    the mask (MASKED): a padded query row has lse = +inf so p = 0, and the rows of padded keys
    are never stored."""
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        m_mask = offs_m < seq_q
        qd_mask = m_mask[:, None] & d_mask[None, :]
        q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * stride_ds + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=m_mask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=m_mask, other=0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + offset, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                     stride_gb, stride_gs, stride_gh,
                     num_heads, kv_heads, group, seq_q, seq_k, head_dim, qk_scale, sm_scale,
                     CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    start_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = (bhk // kv_heads).to(tl.int64)
    hk = bhk % kv_heads
    offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    n_mask = offs_n < seq_k
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(K + b * stride_kb + hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :],
                mask=kv_mask, other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :],
                mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    offset = seq_k - seq_q
    lo = 0
    mid = 0
    if CAUSAL:
        # the first query tile with a row that sees key start_n * BLOCK_N, and the first whose
        # rows all see the block's last key: tiles in [lo, mid) straddle the diagonal
        lo = (tl.maximum(start_n * BLOCK_N - offset, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n * BLOCK_N + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(mid, tl.cdiv(seq_q, BLOCK_M) * BLOCK_M)
    for g in range(group):
        h = hk * group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_db + h * stride_dh
        row_base = (b * num_heads + h) * seq_q
        if CAUSAL:
            dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, row_base, LSE, DELTA,
                                     stride_qs, stride_ds, offs_n, lo, mid, seq_q, head_dim,
                                     offset, qk_scale, True, BLOCK_M, BLOCK_D, DOT_PREC)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, row_base, LSE, DELTA,
                                 stride_qs, stride_ds, offs_n, mid, seq_q, seq_q, head_dim,
                                 offset, qk_scale, False, BLOCK_M, BLOCK_D, DOT_PREC)
    out_off = b * stride_gb + hk * stride_gh + offs_n[:, None] * stride_gs + offs_d[None, :]
    dk = dk * sm_scale
    if ACCUMULATE:  # add to the caller's running sums (a ring step's dK/dV accumulator)
        dk += tl.load(DK + out_off, mask=kv_mask, other=0.0)
        dv += tl.load(DV + out_off, mask=kv_mask, other=0.0)
    tl.store(DK + out_off, dk, mask=kv_mask)
    tl.store(DV + out_off, dv, mask=kv_mask)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, lo, hi,
                  seq_k, head_dim, offset, qk_scale,
                  MASKED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                  DOT_PREC: tl.constexpr):
    """dq of one query tile over the key blocks [lo, hi). Only causal-diagonal blocks need the
    mask (MASKED): a padded key has k = v = 0, so its ds · k adds nothing."""
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        kv_mask = (offs_n < seq_k)[:, None] & d_mask[None, :]
        k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(offs_n[None, :] <= offs_m[:, None] + offset, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                   stride_gb, stride_gs, stride_gh,
                   num_heads, group, seq_q, seq_k, head_dim, qk_scale, sm_scale,
                   CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    start_m = tl.program_id(0)
    if CAUSAL:  # the last query tiles see the most keys: schedule them first
        start_m = tl.num_programs(0) - 1 - start_m
    bh = tl.program_id(1)
    b = (bh // num_heads).to(tl.int64)
    h = bh % num_heads
    hk = h // group
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < seq_q
    d_mask = offs_d < head_dim
    qd_mask = m_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=qd_mask, other=0.0)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :],
                 mask=qd_mask, other=0.0)
    row = bh.to(tl.int64) * seq_q + offs_m
    lse = tl.load(LSE + row, mask=m_mask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + row, mask=m_mask, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    offset = seq_k - seq_q
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # keys [0, full_hi) are visible to every row of this tile; [full_hi, hi) need the mask
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + offset)
        full_hi = tl.minimum(seq_k, start_m * BLOCK_M + offset + 1)
        full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m,
                           full_hi, hi, seq_k, head_dim, offset, qk_scale,
                           True, BLOCK_N, BLOCK_D, DOT_PREC)
    else:
        full_hi = seq_k
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m,
                       0, full_hi, seq_k, head_dim, offset, qk_scale,
                       False, BLOCK_N, BLOCK_D, DOT_PREC)
    dq_ptrs = DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :]
    dq = dq * sm_scale
    if ACCUMULATE:  # add to the caller's running dq (a ring step)
        dq += tl.load(dq_ptrs, mask=qd_mask, other=0.0)
    tl.store(dq_ptrs, dq, mask=qd_mask)


_KEY = ["seq_q", "seq_k", "head_dim", "CAUSAL"]
# Out and LSE may be the running result itself (an in-place merge reads them first): the
# autotuner must restore them after timing each config, or the first call per shape on a GPU
# would merge the block once per timed run.
_fwd_tuned = triton.autotune(_fwd_configs(), key=_KEY, restore_value=["Out", "LSE"],
                             prune_configs_by={"early_config_prune": _pruner("fwd")})(_fwd_kernel)
# likewise the gradients when the backward accumulates into the caller's buffers
_dkdv_tuned = triton.autotune(_bwd_configs(), key=_KEY, restore_value=["DK", "DV"],
                              prune_configs_by={"early_config_prune": _pruner("dkdv")})(_bwd_dkdv_kernel)
_dq_tuned = triton.autotune(_bwd_configs(), key=_KEY, restore_value=["DQ"],
                            prune_configs_by={"early_config_prune": _pruner("dq")})(_bwd_dq_kernel)


# (BLOCK_M, BLOCK_N) under the interpreter; tests also set unequal tiles, as the GPU configs have
INTERPRET_TILES = (16, 16)


def _launch(kernel, tuned, grid_fn, *args, **kwargs):
    meta = {"BLOCK_M": INTERPRET_TILES[0], "BLOCK_N": INTERPRET_TILES[1]}
    launch(kernel, tuned, grid_fn, meta, *args, **kwargs)


def _head_block(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _scale(q, softmax_scale):
    return q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)


def _require_runnable(t: torch.Tensor) -> None:
    if not triton_runnable(t.device):
        raise RuntimeError(
            "the Triton attention kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
            f"ctxscale.kernels.flash_attention_triton is imported (got a {t.device.type} tensor)"
        )


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether these inputs can run on the Triton kernels (else callers use the blockwise path)."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return False
    on_device = triton_runnable(q.device)
    # The CPU interpreter (triton 3.9) computes bfloat16 tl.dot wrongly: bf16 is CUDA-only.
    bf16_ok = q.device.type != "cpu" or q.dtype != torch.bfloat16
    return (
        on_device
        and bf16_ok
        and q.dtype in _SUPPORTED_DTYPES
        and q.dtype == k.dtype == v.dtype
        and q.device == k.device == v.device
        and k.shape == v.shape
        and q.shape[0] == k.shape[0]
        and q.shape[3] == k.shape[3]
        and 0 < q.shape[3] <= MAX_HEAD_DIM
        and k.shape[2] > 0
        and q.shape[2] % k.shape[2] == 0
        and q.shape[1] > 0
        and k.shape[1] > 0
    )


def _check(q, k, v):
    _check_shapes(q, k, v)
    if not supports(q, k, v):
        raise ValueError(
            f"the Triton attention kernel does not support q {tuple(q.shape)} {q.dtype} on "
            f"{q.device} (needs float16/bfloat16/float32 on CUDA or under TRITON_INTERPRET=1, "
            f"head_dim <= {MAX_HEAD_DIM}, non-empty sequences); use kernels.attention instead"
        )
    _require_runnable(q)


def _forward(q, k, v, causal, softmax_scale, out_dtype, o_prev=None, lse_prev=None,
             inplace=False):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    has_prev = o_prev is not None
    if inplace:  # Out is O_PREV and LSE is LSE_PREV: strided views, checked by the caller
        o, lse = o_prev, lse_prev
    else:
        o = torch.empty(b, sq, h, d, dtype=out_dtype, device=q.device)
        lse = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
        if has_prev:
            o_prev = o_prev.contiguous()
            lse_prev = lse_prev.float().contiguous()
        else:
            o_prev, lse_prev = o, lse  # never read
    scale = _scale(q, softmax_scale)
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)
    _launch(_fwd_kernel, _fwd_tuned, grid, q, k, v, o, lse, o_prev, lse_prev,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            o_prev.stride(0), o_prev.stride(1), o_prev.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2),
            h, h // hk, sq, sk, d, scale * _LOG2E,
            CAUSAL=bool(causal), HAS_PREV=has_prev, BLOCK_D=_head_block(d),
            DOT_PREC=dot_precision(q.dtype))
    return o, lse


def _backward(do, q, k, v, o, lse, causal, softmax_scale, dlse=None, grads=None):
    """(dq, dk, dv) float32; with `grads` (dq or None, dk or None, dv or None) the kernels add
    into the given buffers (strided views allowed, see `accumulate_ok`) and return them; the
    None entries are returned fresh."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    # do in q's dtype: the kernels multiply it with v (and p) in the input precision
    q, k, v, o, do = (t.contiguous() for t in (q, k, v, o, do.to(q.dtype)))
    lse = lse.float().contiguous()
    scale = _scale(q, softmax_scale)
    block_d = _head_block(d)
    delta = torch.empty(b, h, sq, dtype=torch.float32, device=q.device)
    has_dlse = dlse is not None
    dlse_t = dlse.float().contiguous() if has_dlse else delta
    pre_block = 16 if INTERPRET else 64
    _bwd_delta_kernel[(triton.cdiv(sq, pre_block), b * h)](
        o, do, dlse_t, delta, o.stride(0), o.stride(1), o.stride(2),
        do.stride(0), do.stride(1), do.stride(2), h, sq, d,
        HAS_DLSE=has_dlse, BLOCK_M=pre_block, BLOCK_D=block_d)
    dq, dk, dv = grads if grads is not None else (None, None, None)
    acc_q, acc_kv = dq is not None, dk is not None
    if not acc_q:
        dq = torch.empty(b, sq, h, d, dtype=torch.float32, device=q.device)
    if not acc_kv:
        dk = torch.empty(b, sk, hk, d, dtype=torch.float32, device=q.device)
        dv = torch.empty_like(dk)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    meta = dict(CAUSAL=bool(causal), BLOCK_D=block_d, DOT_PREC=dot_precision(q.dtype))
    grid_kv = lambda m: (triton.cdiv(sk, m["BLOCK_N"]), b * hk)
    _launch(_bwd_dkdv_kernel, _dkdv_tuned, grid_kv, q, k, v, do, lse, delta, dk, dv, *common,
            dk.stride(0), dk.stride(1), dk.stride(2), h, hk, h // hk, sq, sk, d,
            scale * _LOG2E, scale, ACCUMULATE=acc_kv, **meta)
    grid_q = lambda m: (triton.cdiv(sq, m["BLOCK_M"]), b * h)
    _launch(_bwd_dq_kernel, _dq_tuned, grid_q, q, k, v, do, lse, delta, dq, *common,
            dq.stride(0), dq.stride(1), dq.stride(2), h, h // hk, sq, sk, d,
            scale * _LOG2E, scale, ACCUMULATE=acc_q, **meta)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale):
        ctx.set_materialize_grads(False)  # an unused lse: dlse None, not a tensor of zeros
        o, lse = _forward(q, k, v, causal, softmax_scale, q.dtype)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (causal, softmax_scale)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse = ctx.saved_tensors
        causal, softmax_scale = ctx.args
        if do is None:  # only lse was used
            do = torch.zeros_like(o)
        dq, dk, dv = _backward(do, q, k, v, o, lse, causal, softmax_scale, dlse)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def flash_attention(q, k, v, *, causal=True, softmax_scale=None):
    """Differentiable FlashAttention-2. q `(b, sq, h, d)`, k/v `(b, sk, h_kv, d)`.
    Returns `(o, lse)`: o in q.dtype, lse float32 `(b, h, sq)` (gradients flow through both)."""
    _check(q, k, v)
    return _FlashAttention.apply(q, k, v, bool(causal), softmax_scale)


def inplace_ok(o_prev: torch.Tensor, lse_prev: torch.Tensor) -> bool:
    """Whether a running result can be merged into in place: float32 tensors (views allowed,
    e.g. a row slice of a larger buffer) whose last dimension is contiguous."""
    return (o_prev.dtype == lse_prev.dtype == torch.float32 and o_prev.stride(-1) == 1
            and o_prev.device == lse_prev.device)


@torch.no_grad()
def flash_attention_forward(q, k, v, *, causal=True, softmax_scale=None, o_prev=None,
                            lse_prev=None, inplace=False):
    """One attention block, no autograd. Returns `(o float32 (b, sq, h, d), lse (b, h, sq))`.

    With `o_prev` `(b, sq, h, d)` and `lse_prev` `(b, h, sq)` (the running result over earlier
    key blocks) the block is merged into them exactly (online softmax), so the result is the
    attention over all keys seen so far. With `inplace=True` the merged result is written into
    `o_prev` and `lse_prev` themselves (which may be strided views, see `inplace_ok`) and they
    are returned: a ring step then costs no extra pass over the running output."""
    _check(q, k, v)
    if (o_prev is None) != (lse_prev is None):
        raise ValueError("pass both o_prev and lse_prev (the running result), or neither")
    if inplace and o_prev is None:
        raise ValueError("inplace=True merges into o_prev and lse_prev: pass them")
    if o_prev is not None:
        b, sq, h, d = q.shape
        if o_prev.shape != q.shape or lse_prev.shape != (b, h, sq):
            raise ValueError(
                f"o_prev must be {tuple(q.shape)} and lse_prev {(b, h, sq)}; got "
                f"{tuple(o_prev.shape)} and {tuple(lse_prev.shape)}"
            )
        if inplace and not inplace_ok(o_prev, lse_prev):
            raise ValueError(
                "inplace=True needs float32 o_prev and lse_prev on one device with a contiguous "
                f"last dimension; got {o_prev.dtype} stride {o_prev.stride()} and "
                f"{lse_prev.dtype}; pass contiguous float32 buffers or inplace=False"
            )
        if o_prev.device != q.device:
            raise ValueError(f"o_prev is on {o_prev.device}, q on {q.device}: use one device")
    return _forward(q, k, v, causal, softmax_scale, torch.float32, o_prev, lse_prev, inplace)


def accumulate_ok(dq, dk, dv) -> bool:
    """Whether the backward can add into these gradient buffers in place (None: not
    accumulated): float32, last dimension contiguous, dk and dv both given or both None and
    with equal strides (views allowed)."""
    if (dk is None) != (dv is None):
        return False
    given = [t for t in (dq, dk, dv) if t is not None]
    return (all(t.dtype == torch.float32 and t.stride(-1) == 1 for t in given)
            and len({t.device for t in given}) <= 1
            and (dk is None or dk.stride() == dv.stride()))


@torch.no_grad()
def flash_attention_backward(do, q, k, v, o, lse, *, causal=True, softmax_scale=None, dlse=None,
                             accumulate_into=None):
    """Backward of one block given the (possibly GLOBAL) output `o` and `lse`: returns this
    block's float32 contribution `(dq (b, sq, h, d), dk, dv (b, sk, h_kv, d))`; summing the
    contributions of all key blocks gives the full gradient. `dlse` `(b, h, sq)` is optional.
    With `accumulate_into=(dq, dk, dv)` (float32 buffers of those shapes, e.g. row slices of a
    ring's running sums, or None for the ones to return fresh; see `accumulate_ok`) the kernels
    add the contribution into the given buffers in place and return them: no separate addition
    pass per ring step."""
    _check(q, k, v)
    if o.shape != q.shape or do.shape != q.shape or lse.shape != (q.shape[0], q.shape[2], q.shape[1]):
        raise ValueError(
            f"do and o must be {tuple(q.shape)} and lse {(q.shape[0], q.shape[2], q.shape[1])}; got "
            f"{tuple(do.shape)}, {tuple(o.shape)}, {tuple(lse.shape)}"
        )
    if accumulate_into is not None:
        for name, buf, like in zip(("dq", "dk", "dv"), accumulate_into, (q, k, v)):
            if buf is not None and (buf.shape != like.shape or buf.device != q.device):
                raise ValueError(
                    f"accumulate_into {name} must be shaped like {name[1]} {tuple(like.shape)} "
                    f"on {q.device}; got {tuple(buf.shape)} on {buf.device}"
                )
        if not accumulate_ok(*accumulate_into):
            raise ValueError(
                "accumulate_into needs float32 buffers with a contiguous last dimension, and dk "
                "and dv both given (with equal strides) or both None; pass such buffers or add "
                "the returned gradients yourself"
            )
    return _backward(do, q, k, v, o, lse, causal, softmax_scale, dlse, accumulate_into)


__all__ = ["supports", "inplace_ok", "accumulate_ok", "flash_attention", "flash_attention_forward",
           "flash_attention_backward"]
