"""Causal depthwise conv1d: the F.conv1d path against the tap-sum oracle, with states.

Both paths compute the same width-term sums; float64 agrees to rounding (1e-12), float32 against
the float64 oracle to a few ulps of a width-4 sum (1e-5 allowed)."""

import pytest
import torch

from ctxscale.kernels import dispatch
from ctxscale.kernels.conv1d import causal_conv1d, causal_conv1d_reference, causal_conv1d_torch

TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(L, *, b=2, d=5, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    return r(b, d, L), r(d, w), r(d), r(b, d, w - 1)


def _run(fn, x, w, bias, s0, dtype, activation):
    leaves = [t.to(dtype).requires_grad_() for t in (x, w, bias, s0)]
    out, fin = fn(*leaves[:3], activation=activation, initial_state=leaves[3],
                  return_final_state=True)
    g = torch.Generator().manual_seed(1)
    wo = torch.randn(out.shape, generator=g, dtype=torch.float64).to(dtype)
    wf = torch.randn(fin.shape, generator=g, dtype=torch.float64).to(dtype)
    return [out, fin, *torch.autograd.grad((out * wo).sum() + (fin * wf).sum(), leaves)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("L", [37, 2, 1])
def test_torch_path_matches_reference(dtype, activation, L):
    x, w, bias, s0 = _inputs(L)
    ref = _run(causal_conv1d_reference, x, w, bias, s0, torch.float64, activation)
    got = _run(causal_conv1d_torch, x, w, bias, s0, dtype, activation)
    for name, a, r in zip(["out", "state", "dx", "dweight", "dbias", "dstate"], got, ref):
        assert _rel(a, r) <= TOL[dtype], name


def test_reference_definition():
    """out[t] = sum_j weight[:, j] * x[t - (W-1) + j]: weight[:, -1] hits the current token."""
    x = torch.zeros(1, 1, 6, dtype=torch.float64)
    x[0, 0, 2] = 1.0
    w = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    out = causal_conv1d_reference(x, w)
    assert out[0, 0].tolist() == [0.0, 0.0, 3.0, 2.0, 1.0, 0.0]


def test_split_with_carried_state_equals_one_pass():
    x, w, bias, s0 = _inputs(29)
    full, fin = causal_conv1d(x, w, bias, activation="silu", initial_state=s0,
                              return_final_state=True)
    state, outs = s0, []
    for a, b in [(0, 1), (1, 3), (3, 17), (17, 29)]:  # pieces shorter than width - 1 included
        o, state = causal_conv1d(x[..., a:b], w, bias, activation="silu", initial_state=state,
                                 return_final_state=True)
        outs.append(o)
    assert _rel(torch.cat(outs, -1), full) <= 1e-12 and torch.equal(state, fin)
    tok = [causal_conv1d_reference(x[..., : t + 1], w, bias, activation="silu",
                                   initial_state=s0)[..., -1:] for t in range(29)]
    assert _rel(torch.cat(tok, -1), full) <= 1e-12


def test_dispatcher_and_errors(monkeypatch):
    x, w, bias, _ = _inputs(9)
    ref = causal_conv1d_reference(x, w, bias)
    for path in ("reference", "torch"):
        monkeypatch.setenv("CTXSCALE_KERNELS_CONV1D", path)
        assert _rel(causal_conv1d(x, w, bias), ref) <= 1e-12
        assert dispatch.chosen_paths()["conv1d"] == path
    monkeypatch.delenv("CTXSCALE_KERNELS_CONV1D")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match="width-1"):
        causal_conv1d(x, w, initial_state=torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="weight"):
        causal_conv1d(x, w[:3])
