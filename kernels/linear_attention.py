"""Causal linear attention with a per-token scalar decay (simple GLA), and its dispatcher.

Semantics are those of flash-linear-attention's simple GLA (Yang et al., "Gated Linear Attention
Transformers with Hardware-Efficient Training", 2023; `fla.ops.simple_gla`), unnormalized:

    S_t = exp(g_t) · S_{t-1} + k_t v_tᵀ          (state, dim_k × dim_v per head)
    o_t = scale · q_tᵀ S_t

Layout: q, k `(batch, seq, heads_qk, dim_k)`, v `(batch, seq, heads, dim_v)`; `log_decay` g is
`(batch, seq, heads)`, `(heads,)` (a fixed per-head decay, RetNet/Lightning style) or None (no
decay, plain linear attention); states `(batch, heads, dim_k, dim_v)` in float32 (float64 for
float64 inputs); `scale` defaults to `dim_k ** -0.5`. The output has q's dtype.

Grouped q/k (Mamba-2's B and C groups, the linear-attention analogue of GQA): `heads_qk` may be
any divisor of `heads`; head i then reads q/k head i // (heads / heads_qk), so a group's q and k
are stored (and kept for the backward) once, not once per head. Its gradient is the sum over the
group's heads.

Paths:
- `recurrent`: the recurrence above token by token; the oracle for tests (float64 capable).
- `chunked`: Lightning Attention-2 (Qin et al., "Lightning Attention-2: A Free Lunch for Handling
  Unlimited Sequence Lengths in Large Language Models", 2024) in PyTorch. The sequence is cut into
  chunks of `chunk_size` tokens; with G the cumulative log decay *within* a chunk,

      o_i = scale · [ Σ_{j≤i in chunk} (q_i·k_j) e^{G_i−G_j} v_j  +  e^{G_i} q_iᵀ S_prev ]
      S_next = e^{G_C} S_prev + Σ_j e^{G_C−G_j} k_j v_jᵀ

  Every exponent is a difference G_i − G_j with i ≥ j (or G_i itself), so for decays ≤ 1 it is
  ≤ 0 and nothing overflows however long the sequence is; the mask is applied *before* the
  exponential. Chunks are processed a segment (`segment_chunks` chunks) at a time, vectorized
  inside the segment, with the state carried from segment to segment. When gradients are needed
  each segment is checkpointed (recomputed in the backward pass), so autograd memory is
  O(seq · dim) for the inputs plus one segment's intermediates, not O(seq · chunk).
- `triton`: `ctxscale.kernels.linear_attention_triton.linear_attention` (same signature) on CUDA
  or in the Triton interpreter, when that module exists and its `supports(...)` accepts the call.

Packed sequences: `segments` `(batch, seq)` (document ids, see `kernels/recurrent_segments.py`)
resets the state at every document start, S_t = k_t v_tᵀ there, and keeps `initial_state` to
the first document. In the chunked form, with run_i the document index of token i, the
intra-chunk weights get [run_i = run_j], the read of S_prev [run_i = run of the token before the
chunk], a key's write to S_next [run_j = run of the chunk's last token] and the carry of S_prev
[both runs equal]: the same exponents, masked, so the form stays exact and overflow-free.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ctxscale.kernels.dispatch import (
    eager,
    forced_path,
    log_choice,
    module_available,
    want_triton,
)
from ctxscale.kernels.recurrent_segments import check_segments, pad_runs, runs_with_previous

DEFAULT_CHUNK = 64
DEFAULT_SEGMENT_CHUNKS = 16


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(q, k, v, log_decay, initial_state, segments=None):
    """Validate shapes; return log decay as `(batch, heads, seq)` in the compute dtype, or None."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "linear_attention expects q, k (batch, seq, heads_qk, dim_k) and v (batch, seq, heads, "
            f"dim_v); got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if q.shape != k.shape:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must have the same shape")
    if v.shape[:2] != q.shape[:2]:
        raise ValueError(f"v {tuple(v.shape)} must share (batch, seq) with q {tuple(q.shape)}")
    if q.shape[2] < 1 or v.shape[2] % q.shape[2]:
        raise ValueError(
            f"v has {v.shape[2]} heads and q/k {q.shape[2]}: the q/k heads must divide v's "
            "(each q/k head serves heads / heads_qk consecutive heads); pass q and k with one "
            "head per v head, or a divisor of v's head count"
        )
    b, n, _, dk = q.shape
    h, dv = v.shape[2], v.shape[-1]
    cdt = _compute_dtype(q.dtype)
    g = None
    if log_decay is not None:
        if log_decay.shape == (h,):
            g = log_decay.to(cdt).view(1, h, 1).expand(b, h, n)
        elif log_decay.shape == (b, n, h):
            g = log_decay.to(cdt).transpose(1, 2)
        else:
            raise ValueError(
                f"log_decay has shape {tuple(log_decay.shape)}; expected (batch, seq, heads) = "
                f"{(b, n, h)} or (heads,) = {(h,)}, or None for no decay"
            )
    if initial_state is not None and initial_state.shape != (b, h, dk, dv):
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)}; expected (batch, heads, "
            f"dim_k, dim_v) = {(b, h, dk, dv)}"
        )
    if segments is not None:
        check_segments(segments, b, n, q.device, what="linear_attention")
    return g


def _default_scale(q, scale):
    return q.shape[-1] ** -0.5 if scale is None else scale


# ---------------------------------------------------------------- reference
def linear_attention_recurrent(
    q, k, v, *, log_decay=None, scale=None, initial_state=None, return_final_state=False,
    segments=None,
):
    """Token-by-token recurrence (the oracle). Same arguments and returns as `linear_attention`."""
    g = _check_inputs(q, k, v, log_decay, initial_state, segments)
    scale = _default_scale(q, scale)
    cdt = _compute_dtype(q.dtype)
    r = v.shape[2] // q.shape[2]  # heads of v per q/k head (grouped q/k)
    b, n, _, dk = q.shape
    h, dv = v.shape[2], v.shape[-1]
    qc, kc = (x.to(cdt).repeat_interleave(r, dim=2) for x in (q, k))
    vc = v.to(cdt)
    state = (
        initial_state.to(cdt)
        if initial_state is not None
        else torch.zeros(b, h, dk, dv, dtype=cdt, device=q.device)
    )
    outs = []
    for t in range(n):
        if g is not None:
            state = state * torch.exp(g[:, :, t])[:, :, None, None]
        if segments is not None and t > 0:  # a document starts: forget the state
            keep = (segments[:, t] == segments[:, t - 1]).to(cdt)
            state = state * keep[:, None, None, None]
        state = state + kc[:, t, :, :, None] * vc[:, t, :, None, :]
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qc[:, t], state))
    o = torch.stack(outs, dim=1) if outs else vc.new_zeros(b, 0, h, dv)
    o = o.to(q.dtype)
    return (o, state) if return_final_state else o


# ---------------------------------------------------------------- chunked (Lightning Attention-2)
def _document_masks(run, nc: int, C: int):
    """Masks of one segment's documents, from `run` `(b, T + 1)` (the document index of the token
    before the segment, then of each token; see `kernels/recurrent_segments.py`), padded to
    nc·C tokens with the last token's run. Returns (same `(b,1,1,nc,C,C)`: query and key in one
    document; read `(b,1,1,nc,C,1)`: the query is in the document of the token before its
    chunk, so it reads S_prev; write `(b,1,1,nc,C,1)`: the key is in the chunk's last document,
    so it reaches S_next; carry `(b,1,1,nc)`: S_prev survives the chunk)."""
    b = run.shape[0]
    run = pad_runs(run, nc * C + 1)
    tokens = run[:, 1:].reshape(b, 1, 1, nc, C)
    prev = run[:, :-1].reshape(b, 1, 1, nc, C)[..., :1]
    end = tokens[..., -1:]
    same = tokens.unsqueeze(-1) == tokens.unsqueeze(-2)
    return same, (tokens == prev).unsqueeze(-1), (tokens == end).unsqueeze(-1), (prev == end)[..., 0]


def _segment(q, k, v, g, state, chunk_size: int, run=None):
    """One segment. q, k `(b, hk, T, dk)` (q already scaled), v `(b, h, T, dv)` with h a multiple
    of hk, g `(b, h, T)` or None, state `(b, h, dk, dv)`, run None or `(b, T + 1)` (document
    resets, see `_document_masks`). Returns (o `(b, h, T, dv)`, state after the segment). Heads
    are laid out as (hk, r = h / hk): a group's q·k scores are formed once and broadcast over
    its r heads, whose decays (and so masks) differ."""
    b, hk, T, dk = q.shape
    h, dv = v.shape[1], v.shape[-1]
    r = h // hk
    C = chunk_size
    nc = -(-T // C)
    pad = nc * C - T
    if pad:
        # zero k/v and zero log decay leave the state untouched; padded outputs are dropped
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g = F.pad(g, (0, pad)) if g is not None else None
    q = q.reshape(b, hk, 1, nc, C, dk)
    k = k.reshape(b, hk, 1, nc, C, dk)
    v = v.reshape(b, hk, r, nc, C, dv)
    state = state.reshape(b, hk, r, dk, dv)
    visible = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    read = write = carry = None
    if run is not None:
        same, read, write, carry = _document_masks(run, nc, C)
        visible = visible & same
    scores = torch.matmul(q, k.transpose(-1, -2))  # b hk 1 nc C C
    if g is None:
        scores = scores.masked_fill(~visible, 0.0)
        k_write = k if write is None else k * write
        kv_local = torch.matmul(k_write.transpose(-1, -2), v)  # b hk r nc dk dv
        chunk_decay = None if carry is None else carry.to(q.dtype)
        q_inter = q if read is None else q * read
    else:
        G = g.reshape(b, hk, r, nc, C).cumsum(-1)
        diff = G.unsqueeze(-1) - G.unsqueeze(-2)  # G_i - G_j
        scores = scores * torch.exp(torch.where(visible, diff, float("-inf")))
        G_end = G[..., -1:]
        w_write = torch.exp(G_end - G).unsqueeze(-1)
        w_read = torch.exp(G).unsqueeze(-1)
        chunk_decay = torch.exp(G_end.squeeze(-1))  # b hk r nc
        if run is not None:
            w_write, w_read, chunk_decay = w_write * write, w_read * read, chunk_decay * carry
        kv_local = torch.matmul((k * w_write).transpose(-1, -2), v)
        q_inter = q * w_read
    before = []
    # unbind once: indexing inside the loop would cost a full-size gradient per chunk
    decays = chunk_decay.unbind(3) if chunk_decay is not None else [None] * nc
    for decay_c, kv_c in zip(decays, kv_local.unbind(3)):
        before.append(state)
        if decay_c is not None:
            state = state * decay_c[..., None, None]
        state = state + kv_c
    states_before = torch.stack(before, dim=3)  # b hk r nc dk dv
    o = torch.matmul(scores, v) + torch.matmul(q_inter, states_before)
    o = o.reshape(b, h, nc * C, dv)[:, :, :T]
    return o, state.reshape(b, h, dk, dv)


def linear_attention_chunked(
    q,
    k,
    v,
    *,
    log_decay=None,
    scale=None,
    initial_state=None,
    return_final_state=False,
    chunk_size: int = DEFAULT_CHUNK,
    segment_chunks: int = DEFAULT_SEGMENT_CHUNKS,
    recompute: bool | None = None,
    segments=None,
):
    """Chunked form (Lightning Attention-2); exact, same returns as `linear_attention`.

    `chunk_size` tokens per chunk (any length works: the last chunk is padded), `segment_chunks`
    chunks vectorized at a time. `recompute` checkpoints each segment (default: when gradients
    are needed and there is more than one segment)."""
    if chunk_size < 1 or segment_chunks < 1:
        raise ValueError(f"chunk_size ({chunk_size}) and segment_chunks ({segment_chunks}) must be >= 1")
    g = _check_inputs(q, k, v, log_decay, initial_state, segments)
    scale = _default_scale(q, scale)
    cdt = _compute_dtype(q.dtype)
    b, n, _, dk = q.shape
    h, dv = v.shape[2], v.shape[-1]
    qh = (q.to(cdt) * scale).transpose(1, 2)
    kh = k.to(cdt).transpose(1, 2)
    vh = v.to(cdt).transpose(1, 2)
    state = (
        initial_state.to(cdt)
        if initial_state is not None
        else torch.zeros(b, h, dk, dv, dtype=cdt, device=q.device)
    )
    seg = chunk_size * segment_chunks
    if recompute is None:
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, log_decay, initial_state)
        )
        recompute = needs_grad and n > seg
    outs = []
    # split (not slicing in the loop): its backward is one concatenation, while each slice's
    # backward would materialize a full-length gradient, quadratic in the number of segments
    pieces = [x.split(seg, dim=2) for x in (qh, kh, vh)]
    g_pieces = g.split(seg, dim=2) if g is not None else [None] * len(pieces[0])
    run = runs_with_previous(segments) if segments is not None else None
    for i, (q_seg, k_seg, v_seg, g_seg) in enumerate(zip(*pieces, g_pieces)):
        run_seg = run[:, i * seg : (i + 1) * seg + 1] if run is not None else None
        args = (q_seg, k_seg, v_seg, g_seg, state, chunk_size, run_seg)
        if recompute:
            o_seg, state = checkpoint(_segment, *args, use_reentrant=False)
        else:
            o_seg, state = _segment(*args)
        outs.append(o_seg)
    o = torch.cat(outs, dim=2) if outs else vh.new_zeros(b, h, 0, dv)
    o = o.transpose(1, 2).to(q.dtype)
    return (o, state) if return_final_state else o


# ---------------------------------------------------------------- dispatcher
def _triton_module():
    name = "ctxscale.kernels.linear_attention_triton"
    if not module_available(name):
        return None
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


@eager
def linear_attention(
    q, k, v, *, log_decay=None, scale=None, initial_state=None, return_final_state=False,
    segments=None,
):
    """Causal linear attention with optional per-token decay; see the module docstring.

    q, k: `(batch, seq, heads_qk, dim_k)` with heads_qk dividing heads (grouped, see the module
    docstring); v: `(batch, seq, heads, dim_v)`; log_decay: `(batch, seq, heads)`, `(heads,)` or
    None; initial_state: `(batch, heads, dim_k, dim_v)`; segments: None or the `(batch, seq)`
    document ids of a packed row (the state resets at each document start; see the module
    docstring). Returns o `(batch, seq, heads, dim_v)`, or `(o, final_state)` with `return_final_state`.
    The path is `CTXSCALE_KERNELS_LINEAR_ATTENTION` (recurrent | chunked | triton) when set, else
    Triton where `CTXSCALE_KERNELS` asks for it and the kernel supports the call, else chunked."""
    kwargs = dict(
        log_decay=log_decay,
        scale=scale,
        initial_state=initial_state,
        return_final_state=return_final_state,
    )
    path = forced_path("linear_attention")
    if path == "recurrent":
        log_choice("linear_attention", "recurrent", "forced")
        return linear_attention_recurrent(q, k, v, **kwargs, segments=segments)
    if path == "triton" or (path is None and want_triton(q.device)):
        mod = _triton_module()
        if mod is not None and mod.supports(q, k, v, **kwargs, segments=segments):
            log_choice("linear_attention", "triton", "forced" if path else "auto")
            return mod.linear_attention(q, k, v, **kwargs, segments=segments)
        if path == "triton":
            raise RuntimeError(
                "CTXSCALE_KERNELS_LINEAR_ATTENTION=triton but the Triton linear-attention kernel "
                "is missing or does not support these inputs; unset the variable to fall back"
            )
        reason = "triton kernel missing or unsupported for these inputs"
    else:
        reason = "forced" if path else "pytorch path"
    log_choice("linear_attention", "chunked", reason)
    return linear_attention_chunked(q, k, v, **kwargs, segments=segments)
