"""kernels/selective_scan_triton.py against the token-by-token float64 oracle
`selective_scan_reference` (mamba-ssm `selective_scan_fn` semantics, plus initial_state).

Tolerances: the kernel is the exact recurrence in float32 (a parallel scan inside each chunk);
against float64 each state is a sum of decayed O(1) terms, a few ulps times the accumulation
depth, ~1e-6 relative: we assert 1e-5 (relative to the largest entry) for out and last_state.
Gradients add one more reduction over time (dA, dD, dB, dC sum over tokens and channels; dΔ uses
a_t x_{t-1} = x_t − b_t), so we allow 1e-4.
"""

import pytest
import torch

from ctxscale.kernels import dispatch
from ctxscale.kernels.selective_scan import selective_scan, selective_scan_reference
from ctxscale.kernels.selective_scan_triton import selective_scan as ss_triton
from ctxscale.kernels.selective_scan_triton import supports

NAMES = ["out", "last_state", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias",
         "dinitial_state"]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(form, device, *, b=2, d=6, n=5, L=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    u, z = r(b, d, L), r(b, d, L)
    delta = torch.rand(b, d, L, generator=g, dtype=torch.float64) - 0.5
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 4.0
    if form == "plain":
        B, C = r(b, n, L), r(b, n, L)
    else:  # grouped: 3 groups of d / 3 channels
        B, C = r(b, 3, n, L), r(b, 3, n, L)
    x = dict(u=u, delta=delta, A=A, B=B, C=C, D=r(d), z=z, delta_bias=r(d) * 0.3,
             initial_state=r(b, d, n))
    return {k: v.to(device) for k, v in x.items()}


def _run(fn, inputs, dtype, *, full=True):
    x = {k: v.to(torch.float32 if k == "initial_state" and dtype != torch.float64 else dtype)
         .requires_grad_() for k, v in inputs.items()}
    if not full:
        x["D"] = x["z"] = x["delta_bias"] = None
    out, last = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                   full, True, initial_state=x["initial_state"])
    g = torch.Generator().manual_seed(1)
    wo = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    ws = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.device, last.dtype)
    leaves = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((out * wo).sum() + (last * ws).sum(), present))
    return [out, last] + [next(grads) if t is not None else None for t in leaves]


@pytest.mark.parametrize("form,L,full", [("plain", 37, True), ("grouped", 70, True),
                                         ("plain", 45, False)])
def test_triton_matches_reference(form, L, full, device):
    inputs = _inputs(form, device, L=L)
    ref = _run(selective_scan_reference, inputs, torch.float64, full=full)
    got = _run(ss_triton, inputs, torch.float32, full=full)
    assert got[0].dtype == torch.float32 and got[1].shape == (2, 6, 5)
    for name, a, r in zip(NAMES, got, ref):
        if r is None:
            assert a is None, name
            continue
        tol = 1e-5 if name in ("out", "last_state") else 1e-4
        assert a.shape == r.shape and _rel(a, r) <= tol, (name, _rel(a, r))


def test_output_only_and_no_initial_state(device):
    x = _inputs("plain", device, d=8, L=21)
    args = [x[k].float() for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    out = ss_triton(*args, delta_softplus=True)
    ref = selective_scan_reference(*(t.double() for t in args), delta_softplus=True)
    assert _rel(out, ref) <= 1e-5


def test_dispatcher_runs_triton(monkeypatch, device):
    monkeypatch.setenv("CTXSCALE_KERNELS_SELECTIVE_SCAN", "triton")
    x = _inputs("grouped", device, L=19)
    args = [x[k].float() for k in ("u", "delta", "A", "B", "C", "D", "z")]
    out = selective_scan(*args)
    assert dispatch.chosen_paths()["selective_scan"] == "triton"
    assert _rel(out, selective_scan_reference(*(t.double() for t in args))) <= 1e-5


def test_supports(device):
    x = _inputs("plain", device, L=5)
    f = {k: v.float() for k, v in x.items()}
    assert supports(f["u"], f["delta"], f["A"], f["B"], f["C"])
    assert not supports(x["u"], x["delta"], x["A"], x["B"], x["C"])  # float64: PyTorch paths
    fixed_B = torch.randn(6, 5, device=device)
    assert not supports(f["u"], f["delta"], f["A"], fixed_B, f["C"])  # fixed B: chunked path
