"""Tiles, masks and PyTorch's fused CPU kernel for the attention paths of
`kernels/attention.py` (its module docstring has the contract): which (query tile, key tile)
pairs a causal and/or document mask leaves, their masks, the exact log-sum-exp merge of partial
results, and the calls of `aten._scaled_dot_product_flash_attention_for_cpu` (and its backward)
on whole blocks or, with document ids, on each remaining tile pair."""

from __future__ import annotations

import torch

from ctxscale.kernels.dispatch import forced_path


def _check_segments(q, k, q_segments, k_segments) -> bool:
    """Validate document segment ids (every attention path, the Triton kernel's included);
    True when given."""
    if q_segments is None and k_segments is None:
        return False
    if q_segments is None or k_segments is None:
        given, missing = (("q_segments", "k_segments") if k_segments is None
                          else ("k_segments", "q_segments"))
        raise ValueError(
            f"{given} was given without {missing}: document masking needs both q_segments and "
            "k_segments (the document id of every query and key token); pass both, or neither "
            "for plain (causal) attention"
        )
    for name, seg, x in (("q_segments", q_segments, q), ("k_segments", k_segments, k)):
        shape = tuple(x.shape[:2])
        if not isinstance(seg, torch.Tensor):
            raise ValueError(f"{name} must be an int32 or int64 integer tensor of shape (batch, "
                             f"seq) = {shape}; got a {type(seg).__name__}")
        if tuple(seg.shape) != shape or seg.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be an int32 or int64 integer tensor of shape (batch, "
                             f"seq) = {shape}; got {seg.dtype} {tuple(seg.shape)} (expected shape "
                             f"{shape})")
        if seg.device != q.device:
            raise ValueError(f"{name} is on {seg.device} and q on {q.device}: put the document "
                             "ids on q's device")
    return True


def _segment_mask(q_segments, k_segments, q0, ql, k0, kl):
    """(batch, 1, 1, ql, kl) True where the query and key tokens are in the same document."""
    qs = q_segments[:, q0 : q0 + ql]
    ks = k_segments[:, k0 : k0 + kl]
    return (qs.unsqueeze(-1) == ks.unsqueeze(-2))[:, None, None]


def _causal_mask(q_start: int, q_len: int, k_start: int, k_len: int, offset: int, device):
    """True where query (q_start + i) may attend key (k_start + j): j <= i + offset."""
    qi = torch.arange(q_start, q_start + q_len, device=device).unsqueeze(1)
    kj = torch.arange(k_start, k_start + k_len, device=device).unsqueeze(0)
    return kj <= qi + offset


def _tiles(n: int, block: int):
    return [(s, min(block, n - s)) for s in range(0, n, block)]


def _visible(q0, ql, k0, kl, offset) -> str:
    """'none', 'full' or 'partial': how much of a (q tile, k tile) pair a causal mask keeps."""
    if k0 > q0 + ql - 1 + offset:
        return "none"
    if k0 + kl - 1 <= q0 + offset:
        return "full"
    return "partial"


def _tile_ranges(segments, block):
    """Per tile of `block` tokens: (min, max) document id over the batch (one host sync)."""
    n = segments.shape[1]
    tiles = _tiles(n, block)
    if not tiles:
        return []
    pad = tiles[-1][0] + block - n
    seg = segments
    lo = torch.nn.functional.pad(seg, (0, pad), value=torch.iinfo(seg.dtype).max)
    hi = torch.nn.functional.pad(seg, (0, pad), value=torch.iinfo(seg.dtype).min)
    lo = lo.view(seg.shape[0], len(tiles), block).amin((0, 2))
    hi = hi.view(seg.shape[0], len(tiles), block).amax((0, 2))
    return list(zip(lo.tolist(), hi.tolist()))


def _tile_pairs(sq, sk, block, causal, offset, q_segments=None, k_segments=None):
    """The (query tile, key tile) pairs that can see anything, each as (q0, ql, k0, kl, vis):
    vis 'full' (nothing masked), 'partial' (cut by the causal mask only) or 'segments' (the
    document mask applies, and the causal one where `causal`). Pairs beyond the causal
    diagonal, or whose document id ranges do not meet, are left out; a pair inside one document
    (a single id on both sides over the whole batch) needs no document mask."""
    q_tiles, k_tiles = _tiles(sq, block), _tiles(sk, block)
    if q_segments is not None:
        q_rng, k_rng = _tile_ranges(q_segments, block), _tile_ranges(k_segments, block)
    pairs = []
    for i, (q0, ql) in enumerate(q_tiles):
        for j, (k0, kl) in enumerate(k_tiles):
            vis = _visible(q0, ql, k0, kl, offset) if causal else "full"
            if vis == "none":
                continue
            if q_segments is not None:
                if q_rng[i][1] < k_rng[j][0] or q_rng[i][0] > k_rng[j][1]:
                    continue
                if not q_rng[i][0] == q_rng[i][1] == k_rng[j][0] == k_rng[j][1]:
                    vis = "segments"
            pairs.append((q0, ql, k0, kl, vis))
    return pairs


def _pair_mask(q0, ql, k0, kl, vis, causal, offset, q_segments, k_segments, device):
    """(…, ql, kl) visibility of one tile pair that is not 'full': the causal cut, and the same
    document where vis is 'segments'."""
    mask = _causal_mask(q0, ql, k0, kl, offset, device) if causal else None
    if vis == "segments":
        seg = _segment_mask(q_segments, k_segments, q0, ql, k0, kl)
        mask = seg if mask is None else seg & mask
    return mask


def _cpu_flash_ok(q, k, causal) -> bool:
    """PyTorch's fused CPU flash-attention kernel returns (o, lse) and has a backward that takes a
    given (o, lse): the same contract as the blockwise path, several times faster on CPU. Used for
    float32 on CPU (float64 stays on the blockwise path so float64 oracles stay exact), when its
    top-left causal alignment equals ours (seq_q == seq_k) and the blockwise path is not forced."""
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and (not causal or q.shape[1] == k.shape[1])
        and forced_path("attention") != "blockwise"
    )


def _to_bhsd(x, heads):
    """(b, s, h_kv, d) -> (b, heads, s, d), repeating kv heads for grouped-query attention."""
    x = x.transpose(1, 2)
    if x.shape[1] != heads:
        x = x.repeat_interleave(heads // x.shape[1], dim=1)
    return x.contiguous()


def _cpu_flash_forward(q, k, v, causal, scale):
    h = q.shape[2]
    o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        _to_bhsd(q, h), _to_bhsd(k, h), _to_bhsd(v, h), 0.0, causal, scale=scale
    )
    return o.transpose(1, 2), lse.float()


def _cpu_flash_backward(do, q, k, v, o, lse, causal, scale):
    h, hk = q.shape[2], k.shape[2]
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _to_bhsd(do.to(q.dtype), h), _to_bhsd(q, h), _to_bhsd(k, h), _to_bhsd(v, h),
        _to_bhsd(o.to(q.dtype), h), lse.float().contiguous(), 0.0, causal, scale=scale,
    )
    b, _, sk, d = dk.shape
    if hk != h:  # sum the gradients of the repeated kv heads back onto their owner
        dk = dk.view(b, hk, h // hk, sk, d).sum(2)
        dv = dv.view(b, hk, h // hk, sk, dv.shape[-1]).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


def _segment_kwargs(q_segments, k_segments) -> dict:
    return {} if q_segments is None else {"q_segments": q_segments, "k_segments": k_segments}


def _by_query_tile(pairs):
    """Group `_tile_pairs` output by query tile: [((q0, ql), [(k0, kl, vis), ...]), ...]."""
    grouped: dict = {}
    for q0, ql, k0, kl, vis in pairs:
        grouped.setdefault((q0, ql), []).append((k0, kl, vis))
    return list(grouped.items())


def _additive_mask(mask, b, ql, kl, dtype):
    """A (b, 1, ql, kl) additive mask (0 or −inf) for PyTorch's fused CPU kernel."""
    mask = mask.expand(b, 1, 1, ql, kl).reshape(b, 1, ql, kl)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def _fused_tile_args(q0, ql, k0, kl, vis, causal, offset, q_segments, k_segments, b, dtype,
                     device):
    """(is_causal, additive mask or None, rows that see a key or None) for the fused CPU kernel
    on one tile pair: no mask for a 'full' pair, the kernel's own (top-left) causal flag for a
    square pair on the diagonal, an explicit mask otherwise."""
    if vis == "full":
        return False, None, None
    if vis == "partial" and ql == kl and k0 == q0 + offset:
        return True, None, None
    mask = _pair_mask(q0, ql, k0, kl, vis, causal, offset, q_segments, k_segments, device)
    seen = mask.expand(b, 1, 1, ql, kl).any(-1).view(b, 1, ql)
    return False, _additive_mask(mask, b, ql, kl, dtype), seen


def _cpu_flash_tiles_ok(q) -> bool:
    """Segments on CPU in float32: each tile pair on the fused CPU kernel with its mask."""
    return q.device.type == "cpu" and q.dtype == torch.float32 and forced_path("attention") != "blockwise"


def _cpu_flash_segments_forward(q, k, v, pairs, causal, scale, q_segments, k_segments):
    b, sq, h, _ = q.shape
    offset = k.shape[1] - sq
    qb, kb, vb = _to_bhsd(q, h), _to_bhsd(k, h), _to_bhsd(v, h)
    out = torch.zeros(b, sq, h, v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((b, h, sq), float("-inf"), dtype=torch.float32, device=q.device)
    for q0, ql, k0, kl, vis in pairs:
        is_causal, add, seen = _fused_tile_args(q0, ql, k0, kl, vis, causal, offset, q_segments,
                                                k_segments, b, q.dtype, q.device)
        o_t, lse_t = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qb[:, :, q0 : q0 + ql], kb[:, :, k0 : k0 + kl], vb[:, :, k0 : k0 + kl], 0.0,
            is_causal, attn_mask=add, scale=scale,
        )
        lse_t = lse_t.float()
        if seen is not None:  # the fused kernel returns lse 0 (and o 0) for a fully masked row
            lse_t = torch.where(seen, lse_t, float("-inf"))
        merge_attention(out[:, q0 : q0 + ql], lse[:, :, q0 : q0 + ql], o_t.transpose(1, 2), lse_t)
    return out, lse


def _cpu_flash_segments_backward(do, q, k, v, o, lse, pairs, causal, scale, q_segments,
                                 k_segments):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    offset = sk - sq
    # a row without any visible key (lse −inf, o 0) gets no gradient: zero its do, any lse
    empty = torch.isinf(lse) & (lse < 0)
    lse_k = torch.where(empty, 0.0, lse.float()).contiguous()
    do = do.to(q.dtype).masked_fill(empty.transpose(1, 2).unsqueeze(-1), 0.0)
    qb, kb, vb = _to_bhsd(q, h), _to_bhsd(k, h), _to_bhsd(v, h)
    dob, ob = _to_bhsd(do, h), _to_bhsd(o.to(q.dtype), h)
    dq = torch.zeros(b, h, sq, d, dtype=torch.float32, device=q.device)
    dk = torch.zeros(b, h, sk, d, dtype=torch.float32, device=q.device)
    dv = torch.zeros(b, h, sk, v.shape[-1], dtype=torch.float32, device=q.device)
    for q0, ql, k0, kl, vis in pairs:
        is_causal, add, _ = _fused_tile_args(q0, ql, k0, kl, vis, causal, offset, q_segments,
                                             k_segments, b, q.dtype, q.device)
        rows, cols = slice(q0, q0 + ql), slice(k0, k0 + kl)
        g_q, g_k, g_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dob[:, :, rows].contiguous(), qb[:, :, rows], kb[:, :, cols], vb[:, :, cols],
            ob[:, :, rows].contiguous(), lse_k[:, :, rows].contiguous(), 0.0, is_causal,
            attn_mask=add, scale=scale,
        )
        dq[:, :, rows] += g_q
        dk[:, :, cols] += g_k
        dv[:, :, cols] += g_v
    if hk != h:  # sum the gradients of the repeated kv heads back onto their owner
        dk = dk.view(b, hk, h // hk, sk, d).sum(2)
        dv = dv.view(b, hk, h // hk, sk, dv.shape[-1]).sum(2)
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


@torch.no_grad()
def merge_attention(out, lse, block_out, block_lse) -> None:
    """Merge a partial result `(block_out, block_lse)` over more keys into the running
    `(out (b, s, h, d), lse (b, h, s))`, in place (views allowed), exactly:

        lse' = log(e^lse + e^lse_blk),   out' = e^(lse − lse') out + e^(lse_blk − lse') block_out

    lse = −inf means "no key yet" (a row that neither side has seen stays 0, −inf)."""
    lse_new = torch.logaddexp(lse, block_lse.to(lse.dtype))
    lse_safe = torch.where(torch.isinf(lse_new), torch.zeros_like(lse_new), lse_new)
    w_old = torch.exp(lse - lse_safe).transpose(1, 2).unsqueeze(-1)
    w_new = torch.exp(block_lse.to(lse.dtype) - lse_safe).transpose(1, 2).unsqueeze(-1)
    out.mul_(w_old).add_(block_out.to(out.dtype) * w_new)
    lse.copy_(lse_new)


