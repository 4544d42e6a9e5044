"""Exact softmax attention with log-sum-exp, and its dispatcher.

    o_i = sum_j softmax_j(scale * q_i . k_j) v_j,      lse_i = log sum_j exp(scale * q_i . k_j)

Layout: q `(batch, seq_q, heads, dim)`, k/v `(batch, seq_k, kv_heads, dim)` with
`heads % kv_heads == 0` (grouped-query attention). `lse` is float32 `(batch, heads, seq_q)`.
A causal mask is aligned bottom-right, as in flash-attn >= 2.1: query i attends key j iff
`j <= i + seq_k - seq_q`; a query row with no visible key has output 0 and lse -inf.

Document masking (packed sequences): every entry point takes optional `q_segments` `(batch,
seq_q)` and `k_segments` `(batch, seq_k)` integer tensors, the document id of each token; query
i then sees key j only if also `q_segments[b, i] == k_segments[b, j]` (Megatron-LM's
`reset_attention_mask`, torchtitan's block-causal mask). The tiled paths skip a (query tile, key
tile) pair whose id ranges do not meet, so packed short documents cost about the sum of their
squared lengths rather than the square of the sequence. Paths: the Triton kernel (masks and
skips in the kernel), the tiled PyTorch path (on CPU in float32 each surviving tile pair runs
PyTorch's fused CPU kernel with the tile's mask), and the reference; SDPA and flash-attn are
not used for segments (flash-attn's varlen form needs unpadded batches).

Paths:
- `reference`: materializes the score matrix; the oracle for tests (float64 capable).
- `blockwise`: FlashAttention-2 in PyTorch (online softmax over key tiles, recomputation in the
  backward pass); memory O(seq * tile), never the full score matrix. Exposes
  `attention_forward` / `attention_backward` so context-parallel code can run one block at a time
  and run the backward with a *global* lse (ring attention, LightSeq). On CPU in float32 these
  two call PyTorch's fused CPU flash-attention kernel and its backward, which honour the same
  (o, lse) contract and are several times faster; `CTXSCALE_KERNELS_ATTENTION=blockwise` forces
  the pure PyTorch tiles.
- `sdpa`: `torch.nn.functional.scaled_dot_product_attention` when no lse is asked for.
- `flash_attn`: flash-attn's `flash_attn_func` on CUDA when installed (optional accelerator).
- `triton`: our Triton kernel (`kernels/flash_attention_triton.py`) on CUDA or in the interpreter.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ctxscale.kernels.attention_tiles import (
    _by_query_tile,
    _causal_mask,
    _check_segments,
    _cpu_flash_backward,
    _cpu_flash_forward,
    _cpu_flash_ok,
    _cpu_flash_segments_backward,
    _cpu_flash_segments_forward,
    _cpu_flash_tiles_ok,
    _pair_mask,
    _segment_kwargs,
    _segment_mask,
    _tile_pairs,
    merge_attention,
)
from ctxscale.kernels.dispatch import (
    eager,
    forced_path,
    log_choice,
    module_available,
    want_triton,
)

DEFAULT_BLOCK = 1024
# tile of the document-masked tiled paths: short documents leave most 256-token tile pairs
# empty (measured on CPU, float32, 8192 tokens, fwd+bwd, tile pairs inside one document run
# without a mask: documents of 512 tokens 151 ms with 1024-token tiles, 148 with 256, 177
# with 128; documents of 2048: 397, 391, 531 ms)
SEGMENT_BLOCK = 256


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "attention expects (batch, seq, heads, head_dim) tensors; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if k.shape != v.shape[:3] + (k.shape[3],) or k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must share batch, seq, heads")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch and head_dim")
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"q has {q.shape[2]} heads and k/v {k.shape[2]}: the number of query heads must be a "
            "multiple of the number of key/value heads (grouped-query attention)"
        )


def _grouped(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(b, s, h, d) -> (b, kv_heads, group, s, d) without copying k/v."""
    b, s, h, d = q.shape
    return q.view(b, s, kv_heads, h // kv_heads, d).permute(0, 2, 3, 1, 4)


def _ungrouped(x: torch.Tensor) -> torch.Tensor:
    """(b, kv_heads, group, s, d) -> (b, s, h, d)."""
    b, hk, g, s, d = x.shape
    return x.permute(0, 3, 1, 2, 4).reshape(b, s, hk * g, d)


def attention_reference(q, k, v, *, causal=True, softmax_scale=None, q_segments=None,
                        k_segments=None):
    """Plain attention with the full score matrix. Returns (o in q.dtype, lse float32/64)."""
    _check_shapes(q, k, v)
    segmented = _check_segments(q, k, q_segments, k_segments)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    cdt = _compute_dtype(q.dtype)
    hk = k.shape[2]
    qg = _grouped(q.to(cdt), hk)  # b hk g sq d
    kt = k.to(cdt).permute(0, 2, 3, 1).unsqueeze(2)  # b hk 1 d sk
    vt = v.to(cdt).permute(0, 2, 1, 3).unsqueeze(2)  # b hk 1 sk d
    s = torch.matmul(qg, kt) * scale
    sq, sk = q.shape[1], k.shape[1]
    if causal:
        s = s.masked_fill(~_causal_mask(0, sq, 0, sk, sk - sq, q.device), float("-inf"))
    if segmented:
        s = s.masked_fill(~_segment_mask(q_segments, k_segments, 0, sq, 0, sk), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    o = _ungrouped(torch.matmul(p, vt))
    b, h = q.shape[0], q.shape[2]
    return o.to(q.dtype), lse.reshape(b, h, sq)


def _triton_wanted(forced: str | None, device: torch.device) -> bool:
    """Whether attention should take the Triton kernel: forced by `CTXSCALE_KERNELS_ATTENTION`, or
    asked for by the kernel family (`CTXSCALE_KERNELS`; CUDA by default)."""
    return forced == "triton" or (forced is None and want_triton(device))


def _triton_block_kernel(q, k, v):
    """The Triton module when a ring / LightSeq block should run on it: where `attention()`
    would take Triton and the kernel supports the inputs; else None (the blockwise path)."""
    if not _triton_wanted(forced_path("attention"), q.device):
        return None
    from ctxscale.kernels import flash_attention_triton as fat

    return fat if fat.supports(q, k, v) else None


def _pairs(sq, sk, block_size, causal, offset, q_segments, k_segments):
    """`_tile_pairs` of the tiled paths; with document ids the default tile is SEGMENT_BLOCK."""
    if q_segments is not None and block_size == DEFAULT_BLOCK:
        block_size = SEGMENT_BLOCK
    return _tile_pairs(sq, sk, block_size, causal, offset, q_segments, k_segments)


@torch.no_grad()
def attention_forward(q, k, v, *, causal=True, softmax_scale=None, block_size=DEFAULT_BLOCK,
                      q_segments=None, k_segments=None):
    """Blockwise forward. Returns `(o, lse)`: o in the compute dtype (float32, or float64 for
    float64 inputs) so callers can merge partial results exactly, lse `(batch, heads, seq_q)`.
    On CUDA this is the Triton kernel's block entry point (`flash_attention_forward`).
    `q_segments` / `k_segments`: document ids (see the module docstring)."""
    _check_shapes(q, k, v)
    segmented = _check_segments(q, k, q_segments, k_segments)
    seg_kw = _segment_kwargs(q_segments, k_segments)
    fat = _triton_block_kernel(q, k, v)
    if fat is not None:
        log_choice("attention_block", "triton")
        return fat.flash_attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                           **seg_kw)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if not segmented and _cpu_flash_ok(q, k, causal):
        log_choice("attention_block", "cpu_flash")
        return _cpu_flash_forward(q, k, v, causal, scale)
    cdt = _compute_dtype(q.dtype)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    offset = sk - sq
    pairs = _pairs(sq, sk, block_size, causal, offset, q_segments, k_segments)
    if segmented and _cpu_flash_tiles_ok(q):
        log_choice("attention_block", "cpu_flash_tiles")
        return _cpu_flash_segments_forward(q, k, v, pairs, causal, scale, q_segments, k_segments)
    log_choice("attention_block", "blockwise")
    qg = _grouped(q, hk)  # b hk g sq d
    kT = k.permute(0, 2, 3, 1).unsqueeze(2)  # b hk 1 d sk
    vv = v.permute(0, 2, 1, 3).unsqueeze(2)  # b hk 1 sk d
    out = torch.zeros(b, hk, h // hk, sq, v.shape[-1], dtype=cdt, device=q.device)
    lse_out = torch.full((b, hk, h // hk, sq), float("-inf"), dtype=cdt, device=q.device)
    for (q0, ql), keys in _by_query_tile(pairs):
        q_t = qg[:, :, :, q0 : q0 + ql].to(cdt)
        m = torch.full(q_t.shape[:-1], float("-inf"), dtype=cdt, device=q.device)
        l_sum = torch.zeros_like(m)
        acc = torch.zeros(q_t.shape[:-1] + (v.shape[-1],), dtype=cdt, device=q.device)
        for k0, kl, vis in keys:
            s = torch.matmul(q_t, kT[..., k0 : k0 + kl].to(cdt)) * scale
            if vis != "full":
                mask = _pair_mask(q0, ql, k0, kl, vis, causal, offset, q_segments, k_segments,
                                  q.device)
                s = s.masked_fill(~mask, float("-inf"))
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
            p = torch.exp(s - m_safe.unsqueeze(-1))
            alpha = torch.exp(m - m_safe)
            l_sum = l_sum * alpha + p.sum(dim=-1)
            acc = acc * alpha.unsqueeze(-1) + torch.matmul(p, vv[:, :, :, k0 : k0 + kl].to(cdt))
            m = m_new
        empty = l_sum == 0
        out[:, :, :, q0 : q0 + ql] = acc / torch.where(empty, 1.0, l_sum).unsqueeze(-1)
        lse_out[:, :, :, q0 : q0 + ql] = torch.where(empty, float("-inf"), m + torch.log(l_sum))
    return _ungrouped(out), lse_out.reshape(b, h, sq)


@torch.no_grad()
def attention_forward_merge(q, k, v, out, lse, *, causal=True, softmax_scale=None,
                            block_size=DEFAULT_BLOCK, q_segments=None, k_segments=None) -> None:
    """One block step of ring / LightSeq attention: attention of q against this key block,
    merged in place into the running `(out (b, sq, h, d), lse (b, h, sq))` (compute dtype;
    views such as a row slice of a larger buffer are allowed). On the Triton kernel the merge
    happens inside the kernel, which reads and rewrites `out` and `lse` once; elsewhere it is
    `attention_forward` followed by `merge_attention`."""
    _check_shapes(q, k, v)
    _check_segments(q, k, q_segments, k_segments)
    seg_kw = _segment_kwargs(q_segments, k_segments)
    fat = _triton_block_kernel(q, k, v)
    if fat is not None and fat.inplace_ok(out, lse):
        log_choice("attention_block", "triton")
        log_choice("attention_merge", "in_kernel")
        fat.flash_attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                    o_prev=out, lse_prev=lse, inplace=True, **seg_kw)
        return
    o_b, lse_b = attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                   block_size=block_size, **seg_kw)
    log_choice("attention_merge", "pytorch")
    merge_attention(out, lse, o_b, lse_b)


@torch.no_grad()
def attention_backward(
    do, q, k, v, o, lse, *, causal=True, softmax_scale=None, dlse=None, block_size=DEFAULT_BLOCK,
    q_segments=None, k_segments=None,
):
    """Blockwise backward of `(o, lse) = attention(q, k, v)`.

    `o` and `lse` may be the *global* output and log-sum-exp of a larger attention of which
    (q, k, v) is one block (ring attention): the result is then this block's contribution to the
    gradients. `dlse` (optional, `(batch, heads, seq_q)`) is the gradient flowing into lse.
    Returns (dq, dk, dv) in the compute dtype (float32, or float64); dk/dv summed over the query
    heads that share a key/value head. On CUDA this is the Triton kernel's
    `flash_attention_backward`. `q_segments` / `k_segments`: document ids (module docstring).
    """
    _check_shapes(q, k, v)
    segmented = _check_segments(q, k, q_segments, k_segments)
    seg_kw = _segment_kwargs(q_segments, k_segments)
    fat = _triton_block_kernel(q, k, v)
    if fat is not None:
        log_choice("attention_block", "triton")
        return fat.flash_attention_backward(do, q, k, v, o, lse, causal=causal,
                                            softmax_scale=softmax_scale, dlse=dlse, **seg_kw)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if dlse is None and not segmented and _cpu_flash_ok(q, k, causal):
        return _cpu_flash_backward(do, q, k, v, o, lse, causal, scale)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    offset = sk - sq
    pairs = _pairs(sq, sk, block_size, causal, offset, q_segments, k_segments)
    if dlse is None and segmented and _cpu_flash_tiles_ok(q):
        return _cpu_flash_segments_backward(do, q, k, v, o, lse, pairs, causal, scale,
                                            q_segments, k_segments)
    cdt = _compute_dtype(q.dtype)
    g = h // hk
    qg = _grouped(q, hk)
    dog = _grouped(do, hk)
    og = _grouped(o, hk)
    lse_g = lse.reshape(b, hk, g, sq).to(cdt)
    # D_i = do_i . o_i - dlse_i: the softmax-backward row term (dlse enters as a shift of it).
    delta = (dog.to(cdt) * og.to(cdt)).sum(-1)
    if dlse is not None:
        delta = delta - dlse.reshape(b, hk, g, sq).to(cdt)
    lse_safe = torch.where(torch.isinf(lse_g), 0.0, lse_g)
    kk = k.permute(0, 2, 1, 3).unsqueeze(2)  # b hk 1 sk d
    vv = v.permute(0, 2, 1, 3).unsqueeze(2)
    dq = torch.zeros(b, hk, g, sq, d, dtype=cdt, device=q.device)
    dk = torch.zeros(b, hk, 1, sk, d, dtype=cdt, device=q.device)
    dv = torch.zeros(b, hk, 1, sk, v.shape[-1], dtype=cdt, device=q.device)
    for (q0, ql), keys in _by_query_tile(pairs):
        q_t = qg[:, :, :, q0 : q0 + ql].to(cdt)
        do_t = dog[:, :, :, q0 : q0 + ql].to(cdt)
        lse_t = lse_safe[:, :, :, q0 : q0 + ql].unsqueeze(-1)
        delta_t = delta[:, :, :, q0 : q0 + ql].unsqueeze(-1)
        for k0, kl, vis in keys:
            k_t = kk[:, :, :, k0 : k0 + kl].to(cdt)
            v_t = vv[:, :, :, k0 : k0 + kl].to(cdt)
            s = torch.matmul(q_t, k_t.transpose(-1, -2)) * scale
            p = torch.exp(s - lse_t)
            if vis != "full":
                mask = _pair_mask(q0, ql, k0, kl, vis, causal, offset, q_segments, k_segments,
                                  q.device)
                p = p.masked_fill(~mask, 0.0)
            dv[:, :, :, k0 : k0 + kl] += torch.matmul(p.transpose(-1, -2), do_t).sum(2, keepdim=True)
            dp = torch.matmul(do_t, v_t.transpose(-1, -2))
            ds = p * (dp - delta_t) * scale
            dq[:, :, :, q0 : q0 + ql] += torch.matmul(ds, k_t)
            dk[:, :, :, k0 : k0 + kl] += torch.matmul(ds.transpose(-1, -2), q_t).sum(2, keepdim=True)
    return _ungrouped(dq), _ungrouped(dk), _ungrouped(dv)


@torch.no_grad()
def attention_backward_into(do, q, k, v, o, lse, grads, *, causal=True, softmax_scale=None,
                            dlse=None, block_size=DEFAULT_BLOCK, q_segments=None, k_segments=None):
    """`attention_backward` that adds this block's gradients into running sums: `grads` is
    (dq, dk, dv), each a compute-dtype buffer shaped like q, k, v (views allowed) or None for
    a gradient to return fresh (dk and dv both or neither). Returns (dq, dk, dv) with the given
    buffers in place of the accumulated ones. On the Triton kernel the addition happens inside
    the kernel; elsewhere it is `attention_backward` followed by in-place additions."""
    _check_shapes(q, k, v)
    _check_segments(q, k, q_segments, k_segments)
    seg_kw = _segment_kwargs(q_segments, k_segments)
    fat = _triton_block_kernel(q, k, v)
    if fat is not None and fat.accumulate_ok(*grads):
        log_choice("attention_block", "triton")
        log_choice("attention_grad_sum", "in_kernel")
        return fat.flash_attention_backward(do, q, k, v, o, lse, causal=causal,
                                            softmax_scale=softmax_scale, dlse=dlse,
                                            accumulate_into=tuple(grads), **seg_kw)
    fresh = attention_backward(do, q, k, v, o, lse, causal=causal, softmax_scale=softmax_scale,
                               dlse=dlse, block_size=block_size, **seg_kw)
    log_choice("attention_grad_sum", "pytorch")
    out = []
    for buf, g in zip(grads, fresh):
        out.append(g if buf is None else buf.add_(g.to(buf.dtype)))
    return tuple(out)


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, block_size, q_segments, k_segments):
        # an unused lse then arrives as dlse=None rather than zeros, so the backward can take
        # the fused CPU kernel (which has no dlse input) instead of the PyTorch tile loop
        ctx.set_materialize_grads(False)
        o, lse = attention_forward(
            q, k, v, causal=causal, softmax_scale=softmax_scale, block_size=block_size,
            q_segments=q_segments, k_segments=k_segments,
        )
        o = o.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse, q_segments, k_segments)
        ctx.args = (causal, softmax_scale, block_size)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, q_segments, k_segments = ctx.saved_tensors
        causal, softmax_scale, block_size = ctx.args
        if do is None:  # only lse was used
            do = torch.zeros_like(o)
        dq, dk, dv = attention_backward(
            do, q, k, v, o, lse, causal=causal, softmax_scale=softmax_scale, dlse=dlse,
            block_size=block_size, q_segments=q_segments, k_segments=k_segments,
        )
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None


def attention_blockwise(q, k, v, *, causal=True, softmax_scale=None, block_size=DEFAULT_BLOCK,
                        q_segments=None, k_segments=None):
    """Differentiable blockwise attention. Returns (o, lse)."""
    return _BlockwiseAttention.apply(q, k, v, causal, softmax_scale, block_size, q_segments,
                                     k_segments)


def _sdpa(q, k, v, causal, softmax_scale):
    """SDPA in (b, s, h, d) layout. Only called when seq_q == seq_k or not causal.

    Grouped-query attention: on CPU SDPA's own `enable_gqa` (no repeated k/v; measured 1.2-1.4x
    faster forward+backward at 256-1024 tokens, benchmarks/kernels.py). On CUDA k/v are repeated:
    the memory-efficient backend has no GQA form and would fall back to the math backend."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    gqa = {}
    if kt.shape[1] != qt.shape[1]:
        if q.device.type == "cpu":
            gqa = {"enable_gqa": True}
        else:
            rep = qt.shape[1] // kt.shape[1]
            kt = kt.repeat_interleave(rep, dim=1)
            vt = vt.repeat_interleave(rep, dim=1)
    o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=softmax_scale, **gqa)
    return o.transpose(1, 2)


def _flash_attn(q, k, v, causal, softmax_scale, return_lse):
    fa = importlib.import_module("flash_attn")
    out = fa.flash_attn_func(
        q, k, v, causal=causal, softmax_scale=softmax_scale, return_attn_probs=return_lse
    )
    if return_lse:
        o, lse, _ = out
        return o, lse.float()
    return out


def _flash_attn_ok(q, return_lse) -> bool:
    return (
        q.device.type == "cuda"
        and q.dtype in (torch.float16, torch.bfloat16)
        and q.shape[-1] <= 256
        and module_available("flash_attn")
        and not (return_lse and torch.is_grad_enabled())  # flash-attn's lse is not differentiable
    )


@eager
def attention(q, k, v, *, causal=True, softmax_scale=None, return_lse=False, q_segments=None,
              k_segments=None):
    """Exact softmax attention (see the module docstring). Returns o, or (o, lse) with
    `return_lse=True` (lse float32 `(batch, heads, seq_q)`, differentiable on every path that
    returns it). `q_segments` / `k_segments` `(batch, seq)`: document ids; a query sees only
    keys of its own document (module docstring)."""
    _check_shapes(q, k, v)
    segmented = _check_segments(q, k, q_segments, k_segments)
    seg_kw = _segment_kwargs(q_segments, k_segments)
    forced = forced_path("attention")
    sq, sk = q.shape[1], k.shape[1]
    if forced == "reference":
        log_choice("attention", "reference", "forced")
        o, lse = attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale, **seg_kw)
        return (o, lse.float() if lse.dtype != torch.float64 else lse) if return_lse else o
    if _triton_wanted(forced, q.device):
        from ctxscale.kernels import flash_attention_triton as fat

        if fat.supports(q, k, v):
            log_choice("attention", "triton")
            o, lse = fat.flash_attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                         **seg_kw)
            return (o, lse) if return_lse else o
        log_choice("attention", "blockwise", "shape not supported by the Triton kernel")
    elif segmented:
        if forced in ("flash_attn", "sdpa"):
            raise ValueError(
                f"CTXSCALE_KERNELS_ATTENTION={forced} has no document (segment) mask here; unset "
                "it, or choose blockwise, triton or reference"
            )
        log_choice("attention", "blockwise", "document segments")
        o, lse = attention_blockwise(q, k, v, causal=causal, softmax_scale=softmax_scale, **seg_kw)
        return (o, lse) if return_lse else o
    elif forced == "flash_attn" or (forced is None and _flash_attn_ok(q, return_lse)):
        log_choice("attention", "flash_attn")
        return _flash_attn(q, k, v, causal, softmax_scale, return_lse)
    sdpa_ok = not return_lse and (not causal or sq == sk)
    if forced == "sdpa" or (forced in (None, "torch") and sdpa_ok):
        if not sdpa_ok:
            raise ValueError(
                "CTXSCALE_KERNELS_ATTENTION=sdpa cannot return lse or run causal attention with "
                "seq_q != seq_k; unset it"
            )
        log_choice("attention", "sdpa")
        return _sdpa(q, k, v, causal, softmax_scale)
    log_choice("attention", "blockwise")
    o, lse = attention_blockwise(q, k, v, causal=causal, softmax_scale=softmax_scale)
    return (o, lse) if return_lse else o


def attention_flops(batch: int, seq_q: int, seq_k: int, heads: int, head_dim: int, causal: bool):
    """Forward matmul FLOPs (2 matmuls of 2*b*h*sq*sk*d), halved for a causal square."""
    flops = 4.0 * batch * heads * seq_q * seq_k * head_dim
    if causal and seq_q == seq_k:
        flops = flops * (seq_q + 1) / (2.0 * seq_q)
    return flops


__all__ = [
    "attention",
    "attention_reference",
    "attention_forward",
    "attention_forward_merge",
    "merge_attention",
    "attention_backward",
    "attention_backward_into",
    "attention_blockwise",
    "attention_flops",
]
