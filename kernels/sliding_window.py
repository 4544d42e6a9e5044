"""Causal sliding-window attention, exact and blockwise (no full score matrix).

Used by the Titans memory-as-gate and memory-as-layer variants (Behrouz, Zhong, Mirrokni,
"Titans: Learning to Memorize at Test Time", 2024) and by Longformer/Mistral-style local attention.

Query i sits at key position p_i = i + (seq_k − seq_q) (bottom-right aligned, the flash-attn
convention, so k/v may carry a prefix of earlier tokens: a KV cache, or the previous context
parallel rank's halo) and attends the `window` keys p_i − window < j ≤ p_i:

    o_i = Σ_j softmax_j(scale · q_i·k_j) v_j    over those keys, plus every `prefix` key

Optional `prefix_k`/`prefix_v` are keys every query sees whatever its position (Titans'
persistent memory tokens, or attention sinks); they carry no position. Optional `segments`
`(batch, seq_k)` (packed documents: each key's document id, the queries being the last seq_q
keys) keeps every query to the keys of its own document; the prefix stays visible to all.

The blockwise path walks query blocks of `block_size` rows; each block scores only the
`block_size + window − 1` keys it can reach (plus the prefix), so memory and work are
O(seq · (block + window)) instead of O(seq²). It is plain PyTorch autograd, so the backward pass
is exact too. `sliding_window_attention_reference` builds the full masked score matrix and is the
oracle for the tests.

Layout: q `(batch, seq_q, heads, head_dim)`, k/v `(batch, seq_k, kv_heads, head_dim)` with
seq_k ≥ seq_q, prefix_k/prefix_v `(batch or 1, n_prefix, kv_heads, head_dim)`; grouped-query
attention when kv_heads divides heads. Output `(batch, seq_q, heads, head_dim)` in q's dtype;
scores and softmax in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from ctxscale.kernels.dispatch import eager


def _check(q, k, v, window, prefix_k, prefix_v, segments=None):
    if window < 1:
        raise ValueError(f"window={window} must be >= 1 (the number of keys each query sees, "
                         "itself included)")
    if q.dim() != 4 or k.shape != v.shape or k.dim() != 4:
        raise ValueError(f"expected q (b, sq, h, d) and k, v (b, sk, hk, d) of equal shape; got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[1] < q.shape[1]:
        raise ValueError(f"seq_k={k.shape[1]} < seq_q={q.shape[1]}: keys must cover the queries "
                         "(extra keys are a prefix of earlier tokens)")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"{q.shape[2]} query heads are not a multiple of {k.shape[2]} kv heads")
    if (prefix_k is None) != (prefix_v is None):
        raise ValueError("pass both prefix_k and prefix_v, or neither")
    if segments is not None and (tuple(segments.shape) != tuple(k.shape[:2])
                                 or segments.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"segments must be the int32/int64 document ids of the keys, shape "
                         f"(batch, seq_k) = {tuple(k.shape[:2])}; got {segments.dtype} "
                         f"{tuple(segments.shape)}")


def _expand_heads(t, heads):
    return t if t.shape[2] == heads else t.repeat_interleave(heads // t.shape[2], dim=2)


def _compute_dtype(q):
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _same_document(segments, qpos, kpos, allowed):
    """`allowed` `(nq, nk)` narrowed to pairs of one document: `(b, nq, nk)`."""
    return allowed & (segments[:, qpos, None] == segments[:, None, kpos])


@eager
def sliding_window_attention(q, k, v, *, window: int, softmax_scale: float | None = None,
                             prefix_k=None, prefix_v=None, segments=None, block_size: int = 64):
    """Exact causal sliding-window attention, blockwise over queries (see module docstring)."""
    _check(q, k, v, window, prefix_k, prefix_v, segments)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    offset = sk - sq
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    cdt = _compute_dtype(q)
    qc = q.to(cdt)
    kc, vc = _expand_heads(k, h).to(cdt), _expand_heads(v, h).to(cdt)
    if prefix_k is not None:
        pk = _expand_heads(prefix_k, h).to(cdt).expand(b, -1, -1, -1)
        pv = _expand_heads(prefix_v, h).to(cdt).expand(b, -1, -1, -1)
    outs = []
    for qs in range(0, sq, block_size):
        qe = min(qs + block_size, sq)
        lo, hi = max(0, qs + offset - window + 1), qe + offset
        qpos = torch.arange(qs, qe, device=q.device) + offset
        kpos = torch.arange(lo, hi, device=q.device)
        dist_ = qpos[:, None] - kpos[None, :]
        allowed = (dist_ >= 0) & (dist_ < window)  # (nq, nk)
        if segments is not None:
            allowed = _same_document(segments, qpos, kpos, allowed)
        kb, vb = kc[:, lo:hi], vc[:, lo:hi]
        if prefix_k is not None:
            kb, vb = torch.cat([pk, kb], 1), torch.cat([pv, vb], 1)
            allowed = torch.cat([allowed.new_ones(*allowed.shape[:-1], pk.shape[1]), allowed], -1)
        scores = torch.einsum("bqhd,bkhd->bhqk", qc[:, qs:qe], kb) * scale
        scores = scores.masked_fill(~(allowed if segments is None else allowed[:, None]),
                                    float("-inf"))
        outs.append(torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vb))
    if not outs:
        return q.new_zeros(b, 0, h, v.shape[-1])
    return torch.cat(outs, 1).to(q.dtype)


def sliding_window_attention_reference(q, k, v, *, window: int, softmax_scale=None,
                                       prefix_k=None, prefix_v=None, segments=None):
    """Oracle: the full (seq_q × (n_prefix + seq_k)) masked score matrix, one softmax."""
    _check(q, k, v, window, prefix_k, prefix_v, segments)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    scale = d**-0.5 if softmax_scale is None else softmax_scale
    cdt = _compute_dtype(q)
    kc, vc = _expand_heads(k, h).to(cdt), _expand_heads(v, h).to(cdt)
    qpos = torch.arange(sq, device=q.device) + (sk - sq)
    dist_ = qpos[:, None] - torch.arange(sk, device=q.device)[None, :]
    allowed = (dist_ >= 0) & (dist_ < window)
    if segments is not None:
        allowed = _same_document(segments, qpos, torch.arange(sk, device=q.device), allowed)
        allowed = allowed[:, None]
    if prefix_k is not None:
        n_p = prefix_k.shape[1]
        kc = torch.cat([_expand_heads(prefix_k, h).to(cdt).expand(b, -1, -1, -1), kc], 1)
        vc = torch.cat([_expand_heads(prefix_v, h).to(cdt).expand(b, -1, -1, -1), vc], 1)
        allowed = torch.cat([allowed.new_ones(*allowed.shape[:-1], n_p), allowed], -1)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(cdt), kc) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), vc).to(q.dtype)


__all__ = ["sliding_window_attention", "sliding_window_attention_reference"]
