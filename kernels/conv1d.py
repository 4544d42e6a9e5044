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

Paths:
- `reference`: a sum over the width taps (the oracle, float64 capable).
- `torch`: `F.conv1d` with `groups=dim` on the state-padded input.
- `causal_conv1d`: the `causal_conv1d_fn` CUDA kernel when installed, on CUDA, without states.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from ctxscale.kernels.dispatch import forced_path, log_choice, module_available

ACTIVATIONS = (None, "silu", "swish")


def _check(x, weight, bias, activation, initial_state):
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


def _padded(x, weight, initial_state):
    w = weight.shape[1]
    if initial_state is None:
        return F.pad(x, (w - 1, 0))
    return torch.cat([initial_state.to(x.dtype), x], dim=-1)


def _act(y, activation):
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d_reference(
    x, weight, bias=None, *, activation=None, initial_state=None, return_final_state=False
):
    """Sum over taps (the oracle); same arguments and returns as `causal_conv1d`."""
    _check(x, weight, bias, activation, initial_state)
    L, w = x.shape[-1], weight.shape[1]
    xp = _padded(x, weight, initial_state)
    y = sum(weight[:, j, None].to(x.dtype) * xp[:, :, j : j + L] for j in range(w))
    if bias is not None:
        y = y + bias.to(x.dtype)[:, None]
    out = _act(y, activation)
    return (out, xp[:, :, xp.shape[-1] - (w - 1) :]) if return_final_state else out


def causal_conv1d_torch(
    x, weight, bias=None, *, activation=None, initial_state=None, return_final_state=False
):
    """`F.conv1d(groups=dim)` on the state-padded input; same returns as `causal_conv1d`."""
    _check(x, weight, bias, activation, initial_state)
    d, w = weight.shape
    xp = _padded(x, weight, initial_state)
    y = F.conv1d(xp, weight.to(x.dtype).unsqueeze(1), bias.to(x.dtype) if bias is not None else None, groups=d)
    out = _act(y, activation)
    return (out, xp[:, :, xp.shape[-1] - (w - 1) :]) if return_final_state else out


def _cuda_fn():
    if not module_available("causal_conv1d"):
        return None
    try:
        return getattr(importlib.import_module("causal_conv1d"), "causal_conv1d_fn", None)
    except ImportError:
        return None


def causal_conv1d(
    x, weight, bias=None, *, activation=None, initial_state=None, return_final_state=False
):
    """Causal depthwise conv (see the module docstring). x `(batch, dim, seq)`, weight
    `(dim, width)`. The path is `CTXSCALE_KERNELS_CONV1D` (reference | torch | causal_conv1d) when
    set; else the `causal_conv1d` CUDA kernel on CUDA when installed and no states are asked for;
    else `F.conv1d`."""
    path = forced_path("conv1d")
    kwargs = dict(activation=activation, initial_state=initial_state, return_final_state=return_final_state)
    if path == "reference":
        log_choice("conv1d", "reference", "forced")
        return causal_conv1d_reference(x, weight, bias, **kwargs)
    stateless = initial_state is None and not return_final_state
    if path == "causal_conv1d" or (path is None and x.device.type == "cuda"):
        fn = _cuda_fn() if x.device.type == "cuda" else None
        if fn is not None and stateless:
            _check(x, weight, bias, activation, initial_state)
            log_choice("conv1d", "causal_conv1d", "forced" if path else "installed")
            return fn(x, weight, bias, activation=activation)
        if path == "causal_conv1d":
            raise RuntimeError(
                "CTXSCALE_KERNELS_CONV1D=causal_conv1d needs the causal-conv1d package, CUDA "
                "inputs and no states; unset the variable to fall back"
            )
    log_choice("conv1d", "torch", "forced" if path else "pytorch path")
    return causal_conv1d_torch(x, weight, bias, **kwargs)
