"""Causal depthwise 1-D convolution (the short convolution in front of Mamba's scan), and its
dispatcher.

Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", 2023; layout and
conventions of the `causal-conv1d` package (Dao):

    out[b, c, t] = act( bias[c] + Σ_{j=0}^{W-1} weight[c, j] · x[b, c, t − (W−1) + j] )

so `weight[:, -1]` multiplies the current token. Inputs before t = 0 come from `initial_state`
(zeros when None). x `(batch, dim, seq)`; weight `(dim, width)`; bias `(dim,)`; activation None,
"silu" or "swish"; state = the last width−1 inputs `(batch, dim, width − 1)` (for a sequence
shorter than width − 1, older entries come from the initial state). Returns out in x's dtype, or
`(out, final_state)` with `return_final_state`.

Packed sequences: `segments` `(batch, seq)` (document ids, `kernels/recurrent_segments.py`)
keeps every tap inside the token's document: a tap that would read a token of an earlier
document reads zero, the initial state belongs to the first document, and the final state
keeps the last document's inputs (zeros for older positions), so a continuation starts from
that document only. Both paths then sum the taps with a same-document mask.

Paths:
- `reference`: a sum over the width taps (the oracle, float64 capable).
- `torch`: `F.conv1d` with `groups=dim` on the state-padded input.
- `causal_conv1d`: the `causal_conv1d_fn` CUDA kernel when installed, on CUDA, without states.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ctxscale.kernels.dispatch import eager, forced_path, log_choice, module_available
from ctxscale.kernels.recurrent_segments import check_segments, runs

ACTIVATIONS = (None, "silu", "swish")


def _check(x, weight, bias, activation, initial_state, segments=None):
    if x.dim() != 3:
        raise ValueError(f"x has shape {tuple(x.shape)}; expected (batch, dim, seq)")
    b, d, _ = x.shape
    if weight.dim() != 2 or weight.shape[0] != d:
        raise ValueError(f"weight has shape {tuple(weight.shape)}; expected (dim, width) with dim = {d}")
    if bias is not None and bias.shape != (d,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected (dim,) = {(d,)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r} is not one of {ACTIVATIONS}")
    w = weight.shape[1]
    if initial_state is not None and initial_state.shape != (b, d, w - 1):
        raise ValueError(
            f"initial_state has shape {tuple(initial_state.shape)}; expected (batch, dim, width-1) "
            f"= {(b, d, w - 1)}"
        )
    if segments is not None:
        check_segments(segments, b, x.shape[-1], x.device, what="causal_conv1d")


def _padded(x, weight, initial_state):
    w = weight.shape[1]
    if initial_state is None:
        return F.pad(x, (w - 1, 0))
    return torch.cat([initial_state.to(x.dtype), x], dim=-1)


def _act(y, activation):
    return F.silu(y) if activation in ("silu", "swish") else y


def _padded_runs(segments, w: int):
    """Runs of the state-padded input `(batch, 1, w - 1 + seq)`: the state's positions take the
    first token's run (the initial state belongs to the first document)."""
    r = runs(segments)
    return torch.cat([r[:, :1].expand(-1, w - 1), r], dim=1).unsqueeze(1)


def _masked_taps(xp, weight, bias, L: int, rp):
    """Σ_j weight[:, j] · xp[..., j : j + L], each tap times [same document] when `rp` (the
    padded runs) is given."""
    w = weight.shape[1]
    y = 0
    for j in range(w):
        tap = weight[:, j, None].to(xp.dtype) * xp[:, :, j : j + L]
        if rp is not None and j < w - 1:
            tap = tap * (rp[:, :, j : j + L] == rp[:, :, w - 1 :]).to(xp.dtype)
        y = y + tap
    if bias is not None:
        y = y + bias.to(xp.dtype)[:, None]
    return y


def _final_state(xp, w: int, rp):
    """The last w−1 inputs; with documents, those of the last document only."""
    tail = xp[:, :, xp.shape[-1] - (w - 1) :]
    if rp is None or w == 1:
        return tail
    return tail * (rp[:, :, rp.shape[-1] - (w - 1) :] == rp[:, :, -1:]).to(xp.dtype)


def causal_conv1d_reference(
    x, weight, bias=None, *, activation=None, initial_state=None, return_final_state=False,
    segments=None,
):
    """Sum over taps (the oracle); same arguments and returns as `causal_conv1d`."""
    _check(x, weight, bias, activation, initial_state, segments)
    L, w = x.shape[-1], weight.shape[1]
    xp = _padded(x, weight, initial_state)
    rp = _padded_runs(segments, w) if segments is not None else None
    out = _act(_masked_taps(xp, weight, bias, L, rp), activation)
    return (out, _final_state(xp, w, rp)) if return_final_state else out


def causal_conv1d_torch(
    x, weight, bias=None, *, activation=None, initial_state=None, return_final_state=False,
    segments=None,
):
    """`F.conv1d(groups=dim)` on the state-padded input (with `segments`, the masked tap sum);
    same returns as `causal_conv1d`."""
    _check(x, weight, bias, activation, initial_state, segments)
    d, w = weight.shape
    xp = _padded(x, weight, initial_state)
    if segments is not None:
        rp = _padded_runs(segments, w)
        out = _act(_masked_taps(xp, weight, bias, x.shape[-1], rp), activation)
        return (out, _final_state(xp, w, rp)) if return_final_state else out
    y = F.conv1d(xp, weight.to(x.dtype).unsqueeze(1), bias.to(x.dtype) if bias is not None else None, groups=d)
    out = _act(y, activation)
    return (out, _final_state(xp, w, None)) if return_final_state else out


def _cuda_fn():
    if not module_available("causal_conv1d"):
        return None
    try:
        return getattr(importlib.import_module("causal_conv1d"), "causal_conv1d_fn", None)
    except ImportError:
        return None


@eager
def causal_conv1d(
    x, weight, bias=None, *, activation=None, initial_state=None, return_final_state=False,
    segments=None,
):
    """Causal depthwise conv (see the module docstring). x `(batch, dim, seq)`, weight
    `(dim, width)`. The path is `CTXSCALE_KERNELS_CONV1D` (reference | torch | causal_conv1d) when
    set; else the `causal_conv1d` CUDA kernel on CUDA when installed and no states are asked for;
    else `F.conv1d`. `segments`: None or the `(batch, seq)` document ids of packed rows (no tap
    crosses a document start; see the module docstring)."""
    path = forced_path("conv1d")
    kwargs = dict(activation=activation, initial_state=initial_state,
                  return_final_state=return_final_state, segments=segments)
    if path == "reference":
        log_choice("conv1d", "reference", "forced")
        return causal_conv1d_reference(x, weight, bias, **kwargs)
    stateless = initial_state is None and not return_final_state and segments is None
    if path == "causal_conv1d" or (path is None and x.device.type == "cuda"):
        fn = _cuda_fn() if x.device.type == "cuda" else None
        if fn is not None and stateless:
            _check(x, weight, bias, activation, initial_state)
            log_choice("conv1d", "causal_conv1d", "forced" if path else "installed")
            return fn(x, weight, bias, activation=activation)
        if path == "causal_conv1d":
            raise RuntimeError(
                "CTXSCALE_KERNELS_CONV1D=causal_conv1d needs the causal-conv1d package, CUDA "
                "inputs, no states and no segments; unset the variable to fall back"
            )
    log_choice("conv1d", "torch", "forced" if path else "pytorch path")
    return causal_conv1d_torch(x, weight, bias, **kwargs)
