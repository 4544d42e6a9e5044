"""Selective scan (Mamba S6): the chunked path against the sequential oracle.

Tolerances: float64 agrees to rounding (<= 1e-10 relative). float32 runs the same exact
recurrence in another summation order; each state is a sum of ~chunk-many decayed O(1) terms
plus the carried state, so against the float64 oracle the error is a few ulps times the
accumulation depth, ~1e-6 relative; we allow 1e-5 (relative to each tensor's largest entry).
"""

import importlib

import pytest
import torch

from ctxscale.kernels import dispatch
from ctxscale.kernels.selective_scan import (
    selective_scan,
    selective_scan_chunked,
    selective_scan_reference,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
NAMES = ["out", "last_state", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias",
         "dinitial_state"]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(form, *, b=2, d=6, n=5, L=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    u, z = r(b, d, L), r(b, d, L)
    delta = torch.rand(b, d, L, generator=g, dtype=torch.float64) - 0.5
    A = -torch.rand(d, n, generator=g, dtype=torch.float64) * 4.0
    if form == "plain":
        B, C = r(b, n, L), r(b, n, L)
    elif form == "grouped":
        B, C = r(b, 3, n, L), r(b, 3, n, L)
    else:  # fixed B (dim, dstate), variable C
        B, C = r(d, n), r(b, n, L)
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=r(d), z=z, delta_bias=r(d) * 0.3,
                initial_state=r(b, d, n))


def _run(fn, inputs, dtype, *, full=True, **kw):
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    x = {k: v.to(sdt if k == "initial_state" else dtype).requires_grad_() for k, v in inputs.items()}
    if not full:
        x["D"] = x["z"] = x["delta_bias"] = None
    out, last = fn(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                   full, True, initial_state=x["initial_state"], **kw)
    g = torch.Generator().manual_seed(1)
    wo = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    ws = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.dtype)
    leaves = [x[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")]
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((out * wo).sum() + (last * ws).sum(), present))
    return [out, last] + [next(grads) if t is not None else None for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("form", ["plain", "grouped", "fixed"])
@pytest.mark.parametrize("L,chunk,segment", [(37, 4, 3), (101, 16, 2)])
def test_chunked_matches_reference(dtype, form, L, chunk, segment):
    inputs = _inputs(form, L=L)
    ref = _run(selective_scan_reference, inputs, torch.float64)
    got = _run(selective_scan_chunked, inputs, dtype, chunk_size=chunk, segment_chunks=segment)
    for name, a, r in zip(NAMES, got, ref):
        assert _rel(a, r) <= TOL[dtype], (name, _rel(a, r))
    assert got[0].dtype == dtype and got[1].shape == (2, 6, 5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_masked_difference_form_matches_reference(dtype):
    """cumsum_limit=0 forces the O(chunk^2) masked form used for very strong decays."""
    inputs = _inputs("grouped", L=29)
    ref = _run(selective_scan_reference, inputs, torch.float64)
    got = _run(selective_scan_chunked, inputs, dtype, chunk_size=8, segment_chunks=2,
               cumsum_limit=0.0)
    for name, a, r in zip(NAMES, got, ref):
        assert _rel(a, r) <= TOL[dtype], (name, _rel(a, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_strong_decays_halve_the_chunk_and_stay_exact(dtype, monkeypatch):
    """Δ·A down to ~-12 per token: chunk 32 would need |G| up to ~390 > the float32 limit 60, so the
    segments halve their chunk until the cumulative-sum form fits (float64's limit 600 keeps 32)
    instead of taking the O(chunk²) form; still exact."""
    ss = importlib.import_module("ctxscale.kernels.selective_scan")

    plans = []
    orig = ss._chunk_plan
    monkeypatch.setattr(ss, "_chunk_plan", lambda *a: plans.append(orig(*a)) or plans[-1])
    inputs = _inputs("grouped", L=70)
    inputs["A"] = inputs["A"] * 1.5
    inputs["delta"] = inputs["delta"] + 0.5
    ref = _run(selective_scan_reference, inputs, torch.float64)
    got = _run(selective_scan_chunked, inputs, dtype, chunk_size=32, segment_chunks=1)
    chunks = {(c, fits) for c, _, _, fits in plans}
    assert all(fits for _, fits in chunks), chunks  # never the O(chunk²) form
    if dtype == torch.float32:
        assert min(c for c, _ in chunks) < 32, chunks
    else:
        assert chunks == {(32, True)}, chunks
    for name, a, r in zip(NAMES, got, ref):
        assert _rel(a, r) <= TOL[dtype], (name, _rel(a, r))


def test_without_optional_terms():
    """No D, z, delta_bias, softplus: the bare scan and its gradients."""
    inputs = _inputs("plain", L=23)
    inputs["delta"] = inputs["delta"].abs()
    ref = _run(selective_scan_reference, inputs, torch.float64, full=False)
    got = _run(selective_scan_chunked, inputs, torch.float64, full=False, chunk_size=5,
               segment_chunks=2)
    for name, a, r in zip(NAMES, got, ref):
        if r is not None:
            assert _rel(a, r) <= 1e-10, name


def test_split_with_carried_state_equals_one_pass():
    """One pass == pieces with the state carried over == token by token (bare scan + D)."""
    x = _inputs("grouped", L=43)
    args = lambda sl: (x["u"][..., sl], x["delta"][..., sl], x["A"], x["B"][..., sl],
                       x["C"][..., sl], x["D"], x["z"][..., sl], x["delta_bias"], True, True)
    full, last = selective_scan_chunked(*args(slice(None)), initial_state=x["initial_state"],
                                        chunk_size=8)
    state, outs = x["initial_state"], []
    for a, b in [(0, 1), (1, 17), (17, 18), (18, 43)]:
        o, state = selective_scan_chunked(*args(slice(a, b)), initial_state=state, chunk_size=8)
        outs.append(o)
    assert _rel(torch.cat(outs, -1), full) <= 1e-12 and _rel(state, last) <= 1e-12
    tok, tok_last = selective_scan_reference(*args(slice(None)), initial_state=x["initial_state"])
    assert _rel(full, tok) <= 1e-10 and _rel(last, tok_last) <= 1e-10


def test_strong_decay_stays_finite():
    """Δ·A down to -400 per token: exp(-cumsum) would overflow even in float64."""
    x = _inputs("plain", L=50)
    A = x["A"] * 50
    delta = x["delta"].abs() + 1.0
    args = (x["u"], delta, A, x["B"], x["C"])
    out, last = selective_scan_chunked(*(t.float() for t in args), return_last_state=True,
                                       chunk_size=16)
    ref, ref_last = selective_scan_reference(*args, return_last_state=True)
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    assert _rel(out, ref) <= 1e-5 and _rel(last, ref_last) <= 1e-5


def test_dispatcher_and_errors(monkeypatch):
    x = _inputs("plain", L=11)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"])
    ref = selective_scan_reference(*args)
    monkeypatch.setenv("CTXSCALE_KERNELS", "auto")
    for path in ("reference", "chunked"):
        monkeypatch.setenv("CTXSCALE_KERNELS_SELECTIVE_SCAN", path)
        assert _rel(selective_scan(*args), ref) <= 1e-10
        assert dispatch.chosen_paths()["selective_scan"] == path
    monkeypatch.delenv("CTXSCALE_KERNELS_SELECTIVE_SCAN")
    selective_scan(*args)
    assert dispatch.chosen_paths()["selective_scan"] == "chunked"
    with pytest.raises(ValueError, match="dstate"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"][:, :3], x["C"])
    with pytest.raises(ValueError, match="divisible by groups"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"].view(2, 1, 5, 11).expand(2, 4, 5, 11),
                       x["C"])
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(*args, initial_state=torch.zeros(2, 6, 4))


def test_dispatcher_uses_triton_module_when_it_supports_the_call(monkeypatch):
    """Stand-in Triton module: called with the exact arguments when `supports` says yes."""
    import types

    ss_module = importlib.import_module("ctxscale.kernels.selective_scan")

    calls = []
    fake = types.SimpleNamespace(
        supports=lambda *a, **kw: a[5] is not None,  # "supports" only calls with D
        selective_scan=lambda *a, **kw: calls.append((a, kw)) or torch.zeros_like(a[0]),
    )
    monkeypatch.setattr(ss_module, "_import", lambda name: fake if "triton" in name else None)
    monkeypatch.setattr(ss_module, "want_triton", lambda device: True)
    monkeypatch.delenv("CTXSCALE_KERNELS_SELECTIVE_SCAN", raising=False)
    x = _inputs("plain", L=7)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"])
    assert torch.equal(selective_scan(*args, x["D"]), torch.zeros_like(x["u"]))
    assert len(calls[0][0]) == 10 and set(calls[0][1]) == {"initial_state", "segments"}
    assert dispatch.chosen_paths()["selective_scan"] == "triton"
    assert _rel(selective_scan(*args), selective_scan_reference(*args)) <= 1e-10
    assert dispatch.chosen_paths()["selective_scan"] == "chunked"


@pytest.mark.parametrize("form", ["plain", "fixed"])
def test_segment_recompute_and_no_grad_paths_agree(form):
    """The recomputing segment loop (preallocated outputs and gradients), the plain autograd loop
    and the no-grad loop run the same per-segment arithmetic: equal outputs and gradients (float64,
    1e-12: only the order in which dA's per-segment terms are summed may differ)."""
    inputs = _inputs(form, L=53)
    on = _run(selective_scan_chunked, inputs, torch.float64, chunk_size=4, segment_chunks=3,
              recompute=True)
    off = _run(selective_scan_chunked, inputs, torch.float64, chunk_size=4, segment_chunks=3,
               recompute=False)
    for name, a, r in zip(NAMES, on, off):
        assert _rel(a, r) <= 1e-12, (name, _rel(a, r))
    x = inputs
    with torch.no_grad():
        out, last = selective_scan_chunked(
            x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True,
            True, initial_state=x["initial_state"], chunk_size=4, segment_chunks=3)
    assert torch.equal(out, on[0]) and torch.equal(last, on[1])
