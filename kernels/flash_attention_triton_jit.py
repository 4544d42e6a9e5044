"""The Triton kernels of `kernels/flash_attention_triton.py` (FlashAttention-2 forward, the
backward pre-pass, the key-major dk/dv and query-major dq kernels, and their per-tile helpers).
The math, the masking rules (causal bottom-right, document segments), the tiling and the launch
wrappers are described and driven there; this module holds only `@triton.jit` code."""

import triton
import triton.language as tl


@triton.jit
def _id_range(ids, valid):
    """(min, max) of a tile's document ids over its valid positions. Padded positions take a
    sentinel, which can only widen the range: a tile is never skipped wrongly, whatever the ids."""
    return (tl.min(tl.where(valid, ids, 2147483647), 0),
            tl.max(tl.where(valid, ids, -2147483647), 0))


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, cols, seq_k, offset,
              head_dim, qk_scale, same_doc,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
              BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key tile of the online softmax; `same_doc` (BLOCK_M, BLOCK_N) is True where query
    and key share a document (None without segments)."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    kv_mask = (cols < seq_k)[:, None] & d_mask[None, :]
    k = tl.load(k_base + cols[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # log2 domain
    if MASKED:
        visible = (cols < seq_k)[None, :]
        if CAUSAL:
            visible = visible & (cols[None, :] <= offs_m[:, None] + offset)
        if HAS_SEGMENTS:
            visible = visible & same_doc
        s = tl.where(visible, s, float("-inf"))
    elif HAS_SEGMENTS:
        s = tl.where(same_doc, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def _fwd_tile_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs, offs_m, lo, hi,
                   seq_k, offset, head_dim, qk_scale, q_ids, q_lo, q_hi, kseg_base, stride_kss,
                   MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """The key tiles [lo, hi); with segments, a tile whose id range misses the query tile's
    [q_lo, q_hi] shares no document with it and is skipped."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if HAS_SEGMENTS:
            k_ids = tl.load(kseg_base + cols * stride_kss, mask=cols < seq_k, other=0)
            k_lo, k_hi = _id_range(k_ids, cols < seq_k)
            if (q_lo <= k_hi) & (k_lo <= q_hi):
                acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                          offs_m, cols, seq_k, offset, head_dim, qk_scale,
                                          q_ids[:, None] == k_ids[None, :],
                                          MASKED, CAUSAL, True, BLOCK_D, DOT_PREC)
        else:
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                      offs_m, cols, seq_k, offset, head_dim, qk_scale, None,
                                      MASKED, CAUSAL, False, BLOCK_D, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(Q, K, V, Out, LSE, O_PREV, LSE_PREV,
                stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                stride_vb, stride_vs, stride_vh, stride_ob, stride_os, stride_oh,
                stride_pb, stride_ps, stride_ph, stride_lb, stride_lh, stride_ls,
                num_heads, group, seq_q, seq_k, head_dim, qk_scale,
                QSEG, KSEG, stride_qsb, stride_qss, stride_ksb, stride_kss,
                CAUSAL: tl.constexpr, HAS_PREV: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr):
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
    q_ids = None  # the document ids of this tile's queries and their range (with segments)
    q_lo = None
    q_hi = None
    kseg_base = None
    if HAS_SEGMENTS:
        q_ids = tl.load(QSEG + b * stride_qsb + offs_m * stride_qss, mask=m_mask, other=0)
        q_lo, q_hi = _id_range(q_ids, m_mask)
        kseg_base = KSEG + b * stride_ksb

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
                                   q_ids, q_lo, q_hi, kseg_base, stride_kss,
                                   False, CAUSAL, HAS_SEGMENTS, BLOCK_N, BLOCK_D, DOT_PREC)
    acc, l_i, m_i = _fwd_tile_loop(acc, l_i, m_i, q, k_base, v_base, stride_ks, stride_vs,
                                   offs_m, full_hi, hi, seq_k, offset, head_dim, qk_scale,
                                   q_ids, q_lo, q_hi, kseg_base, stride_kss,
                                   True, CAUSAL, HAS_SEGMENTS, BLOCK_N, BLOCK_D, DOT_PREC)

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
def _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, row_base, LSE, DELTA, stride_qs, stride_ds,
                   offs_n, offs_m, seq_q, head_dim, offset, qk_scale, same_doc,
                   MASKED: tl.constexpr, HAS_SEGMENTS: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PREC: tl.constexpr):
    """One query tile's share of dk, dv; `same_doc` (BLOCK_N, BLOCK_M), None without segments."""
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
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
        visible = offs_n[:, None] <= offs_m[None, :] + offset
        if HAS_SEGMENTS:
            visible = visible & same_doc
        p_t = tl.where(visible, p_t, 0.0)
    elif HAS_SEGMENTS:
        p_t = tl.where(same_doc, p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
    dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, row_base, LSE, DELTA, stride_qs, stride_ds,
                    offs_n, lo, hi, seq_q, head_dim, offset, qk_scale,
                    k_ids, k_lo, k_hi, qseg_base, stride_qss,
                    MASKED: tl.constexpr, HAS_SEGMENTS: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """dk, dv of one key block over the query tiles [lo, hi). Only causal-diagonal tiles need
    the causal mask (MASKED): a padded query row has lse = +inf so p = 0, and the rows of padded
    keys are never stored. With segments every tile is masked by document, and a tile whose id
    range misses the key block's [k_lo, k_hi] is skipped."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_m0
        if HAS_SEGMENTS:
            q_ids = tl.load(qseg_base + offs_m * stride_qss, mask=offs_m < seq_q, other=0)
            q_lo, q_hi = _id_range(q_ids, offs_m < seq_q)
            if (q_lo <= k_hi) & (k_lo <= q_hi):
                dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, row_base, LSE, DELTA,
                                        stride_qs, stride_ds, offs_n, offs_m, seq_q, head_dim,
                                        offset, qk_scale, k_ids[:, None] == q_ids[None, :],
                                        MASKED, True, BLOCK_D, DOT_PREC)
        else:
            dk, dv = _bwd_dkdv_tile(dk, dv, k, v, q_base, do_base, row_base, LSE, DELTA,
                                    stride_qs, stride_ds, offs_n, offs_m, seq_q, head_dim,
                                    offset, qk_scale, None, MASKED, False, BLOCK_D, DOT_PREC)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV,
                     stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                     stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                     stride_gb, stride_gs, stride_gh,
                     num_heads, kv_heads, group, seq_q, seq_k, head_dim, qk_scale, sm_scale,
                     QSEG, KSEG, stride_qsb, stride_qss, stride_ksb, stride_kss,
                     CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                     DOT_PREC: tl.constexpr):
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
    k_ids = None  # the document ids of this block's keys and their range (with segments)
    k_lo = None
    k_hi = None
    qseg_base = None
    if HAS_SEGMENTS:
        k_ids = tl.load(KSEG + b * stride_ksb + offs_n * stride_kss, mask=n_mask, other=0)
        k_lo, k_hi = _id_range(k_ids, n_mask)
        qseg_base = QSEG + b * stride_qsb
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
                                     offset, qk_scale, k_ids, k_lo, k_hi, qseg_base, stride_qss,
                                     True, HAS_SEGMENTS, BLOCK_M, BLOCK_D, DOT_PREC)
        dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, q_base, do_base, row_base, LSE, DELTA,
                                 stride_qs, stride_ds, offs_n, mid, seq_q, seq_q, head_dim,
                                 offset, qk_scale, k_ids, k_lo, k_hi, qseg_base, stride_qss,
                                 False, HAS_SEGMENTS, BLOCK_M, BLOCK_D, DOT_PREC)
    out_off = b * stride_gb + hk * stride_gh + offs_n[:, None] * stride_gs + offs_d[None, :]
    dk = dk * sm_scale
    if ACCUMULATE:  # add to the caller's running sums (a ring step's dK/dV accumulator)
        dk += tl.load(DK + out_off, mask=kv_mask, other=0.0)
        dv += tl.load(DV + out_off, mask=kv_mask, other=0.0)
    tl.store(DK + out_off, dk, mask=kv_mask)
    tl.store(DV + out_off, dv, mask=kv_mask)


@triton.jit
def _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, offs_n,
                 seq_k, head_dim, offset, qk_scale, same_doc,
                 MASKED: tl.constexpr, HAS_SEGMENTS: tl.constexpr, BLOCK_D: tl.constexpr,
                 DOT_PREC: tl.constexpr):
    """One key tile's share of dq; `same_doc` (BLOCK_M, BLOCK_N), None without segments."""
    offs_d = tl.arange(0, BLOCK_D)
    kv_mask = (offs_n < seq_k)[:, None] & (offs_d < head_dim)[None, :]
    k = tl.load(k_base + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    p = tl.math.exp2(s - lse[:, None])
    if MASKED:
        visible = offs_n[None, :] <= offs_m[:, None] + offset
        if HAS_SEGMENTS:
            visible = visible & same_doc
        p = tl.where(visible, p, 0.0)
    elif HAS_SEGMENTS:
        p = tl.where(same_doc, p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m, lo, hi,
                  seq_k, head_dim, offset, qk_scale, q_ids, q_lo, q_hi, kseg_base, stride_kss,
                  MASKED: tl.constexpr, HAS_SEGMENTS: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """dq of one query tile over the key blocks [lo, hi). Only causal-diagonal blocks need the
    causal mask (MASKED): a padded key has k = v = 0, so its ds · k adds nothing. With segments
    every block is masked by document, and a block whose id range misses [q_lo, q_hi] is
    skipped."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if HAS_SEGMENTS:
            k_ids = tl.load(kseg_base + offs_n * stride_kss, mask=offs_n < seq_k, other=0)
            k_lo, k_hi = _id_range(k_ids, offs_n < seq_k)
            if (q_lo <= k_hi) & (k_lo <= q_hi):
                dq = _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
                                  offs_m, offs_n, seq_k, head_dim, offset, qk_scale,
                                  q_ids[:, None] == k_ids[None, :], MASKED, True, BLOCK_D,
                                  DOT_PREC)
        else:
            dq = _bwd_dq_tile(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs,
                              offs_m, offs_n, seq_k, head_dim, offset, qk_scale, None,
                              MASKED, False, BLOCK_D, DOT_PREC)
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ,
                   stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                   stride_vb, stride_vs, stride_vh, stride_db, stride_ds, stride_dh,
                   stride_gb, stride_gs, stride_gh,
                   num_heads, group, seq_q, seq_k, head_dim, qk_scale, sm_scale,
                   QSEG, KSEG, stride_qsb, stride_qss, stride_ksb, stride_kss,
                   CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, HAS_SEGMENTS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                   DOT_PREC: tl.constexpr):
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
    q_ids = None  # as in the forward
    q_lo = None
    q_hi = None
    kseg_base = None
    if HAS_SEGMENTS:
        q_ids = tl.load(QSEG + b * stride_qsb + offs_m * stride_qss, mask=m_mask, other=0)
        q_lo, q_hi = _id_range(q_ids, m_mask)
        kseg_base = KSEG + b * stride_ksb
    offset = seq_k - seq_q
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if CAUSAL:
        # keys [0, full_hi) are visible to every row of this tile; [full_hi, hi) need the mask
        hi = tl.minimum(seq_k, (start_m + 1) * BLOCK_M + offset)
        full_hi = tl.minimum(seq_k, start_m * BLOCK_M + offset + 1)
        full_hi = (tl.maximum(full_hi, 0) // BLOCK_N) * BLOCK_N
        dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m,
                           full_hi, hi, seq_k, head_dim, offset, qk_scale,
                           q_ids, q_lo, q_hi, kseg_base, stride_kss,
                           True, HAS_SEGMENTS, BLOCK_N, BLOCK_D, DOT_PREC)
    else:
        full_hi = seq_k
    dq = _bwd_dq_tiles(dq, q, do, lse, delta, k_base, v_base, stride_ks, stride_vs, offs_m,
                       0, full_hi, seq_k, head_dim, offset, qk_scale,
                       q_ids, q_lo, q_hi, kseg_base, stride_kss,
                       False, HAS_SEGMENTS, BLOCK_N, BLOCK_D, DOT_PREC)
    dq_ptrs = DQ + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :]
    dq = dq * sm_scale
    if ACCUMULATE:  # add to the caller's running dq (a ring step)
        dq += tl.load(dq_ptrs, mask=qd_mask, other=0.0)
    tl.store(dq_ptrs, dq, mask=qd_mask)


__all__ = ["_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"]
