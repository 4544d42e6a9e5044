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

Document masking (packed sequences): with `q_segments` `(batch, seq_q)` and `k_segments`
`(batch, seq_k)` (int32/int64 document ids) query i sees key j only if, besides the causal rule,
q_segments[b, i] == k_segments[b, j]; a row whose document has no (visible) key here gets
o = 0, lse = −inf, zero gradients. The kernels take the id pointers with a constexpr
HAS_SEGMENTS, so without segments they compile to the code they compiled to before. With
segments each program loads its tile's ids once and every other tile's ids as it meets them: a
tile pair whose id ranges do not overlap (max q_ids < min k_ids or min q_ids > max k_ids: no
pair can be equal, for any ids, sorted or not) is skipped, loads and products alike, in the
forward and both backward kernels; the tiles that run AND the id equality into their mask, the
otherwise mask-free fully visible tiles included. Packed documents shorter than the sequence
make most off-diagonal tiles skippable. The skip is a branch around a tile's loads and
products; Triton (3.9) does not software-pipeline loads inside such a branch (compiled for
sm_90, the k/v tiles of this path are single-buffered), so a tile that runs costs more here than
in the path without segments.

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

This module is the host side (checks, autotuning, launches, autograd); the `@triton.jit` kernels
are in `kernels/flash_attention_triton_jit.py`.
"""

from __future__ import annotations

import torch
import triton

from ctxscale.kernels.attention import _check_shapes
from ctxscale.kernels.attention_tiles import _check_segments
from ctxscale.kernels.dispatch import shared_memory_per_block, triton_runnable
from ctxscale.kernels.flash_attention_triton_jit import (
    _bwd_delta_kernel,
    _bwd_dkdv_kernel,
    _bwd_dq_kernel,
    _fwd_kernel,
)
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


_KEY = ["seq_q", "seq_k", "head_dim", "CAUSAL", "HAS_SEGMENTS"]
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


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, q_segments=None,
             k_segments=None) -> bool:
    """Whether these inputs can run on the Triton kernels (else callers use the blockwise path).
    Document ids never make the kernels refuse: the segments are accepted so callers can pass
    what they pass to the kernels, and checked (ValueError) by the entry points themselves."""
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


def _segment_args(segments, q):
    """The kernels' (QSEG, KSEG, strides...) arguments and HAS_SEGMENTS; unused stand-ins
    without segments."""
    if segments is None:
        return (q, q, 0, 0, 0, 0), False
    qs, ks = segments
    return (qs, ks, qs.stride(0), qs.stride(1), ks.stride(0), ks.stride(1)), True


def _forward(q, k, v, causal, softmax_scale, out_dtype, o_prev=None, lse_prev=None,
             inplace=False, segments=None):
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
    seg_args, has_segments = _segment_args(segments, q)
    grid = lambda meta: (triton.cdiv(sq, meta["BLOCK_M"]), b * h)
    _launch(_fwd_kernel, _fwd_tuned, grid, q, k, v, o, lse, o_prev, lse_prev,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2),
            o_prev.stride(0), o_prev.stride(1), o_prev.stride(2),
            lse.stride(0), lse.stride(1), lse.stride(2),
            h, h // hk, sq, sk, d, scale * _LOG2E, *seg_args,
            CAUSAL=bool(causal), HAS_PREV=has_prev, HAS_SEGMENTS=has_segments,
            BLOCK_D=_head_block(d),
            DOT_PREC=dot_precision(q.dtype))
    return o, lse


def _backward(do, q, k, v, o, lse, causal, softmax_scale, dlse=None, grads=None, segments=None):
    """(dq, dk, dv) float32; with `grads` (dq or None, dk or None, dv or None) the kernels add
    into the given buffers (strided views allowed, see `accumulate_ok`) and return them; the
    None entries are returned fresh. `segments`: checked (q_segments, k_segments) or None."""
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
    seg_args, has_segments = _segment_args(segments, q)
    meta = dict(CAUSAL=bool(causal), HAS_SEGMENTS=has_segments, BLOCK_D=block_d,
                DOT_PREC=dot_precision(q.dtype))
    grid_kv = lambda m: (triton.cdiv(sk, m["BLOCK_N"]), b * hk)
    _launch(_bwd_dkdv_kernel, _dkdv_tuned, grid_kv, q, k, v, do, lse, delta, dk, dv, *common,
            dk.stride(0), dk.stride(1), dk.stride(2), h, hk, h // hk, sq, sk, d,
            scale * _LOG2E, scale, *seg_args, ACCUMULATE=acc_kv, **meta)
    grid_q = lambda m: (triton.cdiv(sq, m["BLOCK_M"]), b * h)
    _launch(_bwd_dq_kernel, _dq_tuned, grid_q, q, k, v, do, lse, delta, dq, *common,
            dq.stride(0), dq.stride(1), dq.stride(2), h, h // hk, sq, sk, d,
            scale * _LOG2E, scale, *seg_args, ACCUMULATE=acc_q, **meta)
    return dq, dk, dv


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, q_segments, k_segments):
        ctx.set_materialize_grads(False)  # an unused lse: dlse None, not a tensor of zeros
        segments = None if q_segments is None else (q_segments, k_segments)
        o, lse = _forward(q, k, v, causal, softmax_scale, q.dtype, segments=segments)
        ctx.save_for_backward(q, k, v, o, lse, q_segments, k_segments)
        ctx.args = (causal, softmax_scale)
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, q_segments, k_segments = ctx.saved_tensors
        causal, softmax_scale = ctx.args
        if do is None:  # only lse was used
            do = torch.zeros_like(o)
        segments = None if q_segments is None else (q_segments, k_segments)
        dq, dk, dv = _backward(do, q, k, v, o, lse, causal, softmax_scale, dlse,
                               segments=segments)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def flash_attention(q, k, v, *, causal=True, softmax_scale=None, q_segments=None,
                    k_segments=None):
    """Differentiable FlashAttention-2. q `(b, sq, h, d)`, k/v `(b, sk, h_kv, d)`.
    Returns `(o, lse)`: o in q.dtype, lse float32 `(b, h, sq)` (gradients flow through both).

    `q_segments` `(b, sq)` and `k_segments` `(b, sk)` (int32/int64, both or neither): document
    ids; query i then sees key j only if they are equal (and the causal mask allows it). A row
    that sees no key gets o = 0 and lse = -inf (and zero gradients)."""
    _check(q, k, v)
    segments = (q_segments, k_segments) if _check_segments(q, k, q_segments, k_segments) else None
    qs, ks = segments if segments is not None else (None, None)
    return _FlashAttention.apply(q, k, v, bool(causal), softmax_scale, qs, ks)


def inplace_ok(o_prev: torch.Tensor, lse_prev: torch.Tensor) -> bool:
    """Whether a running result can be merged into in place: float32 tensors (views allowed,
    e.g. a row slice of a larger buffer) whose last dimension is contiguous."""
    return (o_prev.dtype == lse_prev.dtype == torch.float32 and o_prev.stride(-1) == 1
            and o_prev.device == lse_prev.device)


@torch.no_grad()
def flash_attention_forward(q, k, v, *, causal=True, softmax_scale=None, o_prev=None,
                            lse_prev=None, inplace=False, q_segments=None, k_segments=None):
    """One attention block, no autograd. Returns `(o float32 (b, sq, h, d), lse (b, h, sq))`.

    With `o_prev` `(b, sq, h, d)` and `lse_prev` `(b, h, sq)` (the running result over earlier
    key blocks) the block is merged into them exactly (online softmax), so the result is the
    attention over all keys seen so far. With `inplace=True` the merged result is written into
    `o_prev` and `lse_prev` themselves (which may be strided views, see `inplace_ok`) and they
    are returned: a ring step then costs no extra pass over the running output.
    `q_segments` / `k_segments`: document ids of q's rows and of this key block, as in
    `flash_attention`."""
    _check(q, k, v)
    segments = (q_segments, k_segments) if _check_segments(q, k, q_segments, k_segments) else None
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
    return _forward(q, k, v, causal, softmax_scale, torch.float32, o_prev, lse_prev, inplace,
                    segments)


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
                             accumulate_into=None, q_segments=None, k_segments=None):
    """Backward of one block given the (possibly GLOBAL) output `o` and `lse`: returns this
    block's float32 contribution `(dq (b, sq, h, d), dk, dv (b, sk, h_kv, d))`; summing the
    contributions of all key blocks gives the full gradient. `dlse` `(b, h, sq)` is optional.
    With `accumulate_into=(dq, dk, dv)` (float32 buffers of those shapes, e.g. row slices of a
    ring's running sums, or None for the ones to return fresh; see `accumulate_ok`) the kernels
    add the contribution into the given buffers in place and return them: no separate addition
    pass per ring step. `q_segments` / `k_segments`: document ids of q's rows and of this key
    block, as in `flash_attention`."""
    _check(q, k, v)
    segments = (q_segments, k_segments) if _check_segments(q, k, q_segments, k_segments) else None
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
    return _backward(do, q, k, v, o, lse, causal, softmax_scale, dlse, accumulate_into,
                     segments)


__all__ = ["supports", "inplace_ok", "accumulate_ok", "flash_attention", "flash_attention_forward",
           "flash_attention_backward"]
