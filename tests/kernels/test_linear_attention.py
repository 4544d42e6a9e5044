"""Linear attention (simple-GLA semantics): the chunked path against the token-by-token oracle.

Tolerances: float64 paths agree to rounding (<= 1e-10 relative). float32 runs the same exact
algorithm in a different summation order; against the float64 oracle each output is a sum of
~seq terms of size O(1), so the error is a few ulps times sqrt(seq) ~ 1e-6 relative; we allow
1e-5 (relative to the largest entry of each compared tensor).
"""

import importlib

import pytest
import torch

from ctxscale.kernels import dispatch
from ctxscale.kernels.linear_attention import (
    linear_attention,
    linear_attention_chunked,
    linear_attention_recurrent,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(dtype, decay, *, b=2, n=37, h=5, dk=24, dv=7, seed=0, hk=None):
    """hk: heads of q and k when grouped (each serving h / hk heads of v); default h."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, hk or h, dk, generator=g, dtype=torch.float64)
    k = torch.randn(b, n, hk or h, dk, generator=g, dtype=torch.float64)
    v = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
    s0 = torch.randn(b, h, dk, dv, generator=g, dtype=torch.float64)
    if decay == "none":
        ld = None
    elif decay == "head":
        ld = -torch.rand(h, generator=g, dtype=torch.float64) * 0.5
    else:
        ld = -torch.rand(b, n, h, generator=g, dtype=torch.float64) * 2.0
    return q, k, v, ld, s0


def _run(fn, q, k, v, ld, s0, dtype, **kw):
    """Output, final state and the gradients of every input for a fixed random cotangent."""
    sdt = torch.float64 if dtype == torch.float64 else torch.float32
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ldl = ld.to(dtype).requires_grad_() if ld is not None else None
    s0l = s0.to(sdt).requires_grad_()
    o, S = fn(*leaves, log_decay=ldl, initial_state=s0l, return_final_state=True, **kw)
    g = torch.Generator().manual_seed(1)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    ws = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.dtype)
    ins = leaves + [s0l] + ([ldl] if ldl is not None else [])
    grads = torch.autograd.grad((o * wo).sum() + (S * ws).sum(), ins)
    return [o, S, *grads]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("n,chunk,segment", [(37, 8, 2), (101, 16, 3), (5, 64, 16)])
def test_chunked_matches_recurrent(dtype, decay, n, chunk, segment):
    q, k, v, ld, s0 = _inputs(dtype, decay, n=n)
    ref = _run(linear_attention_recurrent, q, k, v, ld, s0, torch.float64)
    got = _run(
        linear_attention_chunked, q, k, v, ld, s0, dtype, chunk_size=chunk, segment_chunks=segment
    )
    names = ["o", "final_state", "dq", "dk", "dv", "dinitial_state", "dlog_decay"]
    for name, a, r in zip(names, got, ref):
        assert _rel(a, r) <= TOL[dtype], (name, _rel(a, r))
    assert got[0].dtype == dtype


def _per_head_copies(fn, group):
    """fn on q and k repeated over their groups' heads (autograd sums the copies' gradients)."""
    def run(q, k, v, **kw):
        return fn(q.repeat_interleave(group, 2), k.repeat_interleave(group, 2), v, **kw)
    return run


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("hk", [1, 2])
def test_grouped_qk_equals_per_head_copies(dtype, decay, hk):
    """Grouped q/k (Mamba-2's B and C groups): 6 heads of v reading hk heads of q and k give the
    outputs, states and gradients of q and k copied to every head of their group (gradients
    summed over the group), on the chunked path with several segments and a partial chunk."""
    q, k, v, ld, s0 = _inputs(dtype, decay, n=45, h=6, hk=hk)
    ref = _run(_per_head_copies(linear_attention_recurrent, 6 // hk), q, k, v, ld, s0,
               torch.float64)
    got = _run(linear_attention_chunked, q, k, v, ld, s0, dtype, chunk_size=8, segment_chunks=2)
    names = ["o", "final_state", "dq", "dk", "dv", "dinitial_state", "dlog_decay"]
    for name, a, r in zip(names, got, ref):
        assert a.shape == r.shape, name
        assert _rel(a, r) <= TOL[dtype], (name, _rel(a, r))
    assert got[2].shape == q.shape  # dq per group
    rec = _run(linear_attention_recurrent, q, k, v, ld, s0, torch.float64)  # grouped oracle too
    for name, a, r in zip(names, rec, ref):
        assert _rel(a, r) <= 1e-12, name


def test_recompute_gives_identical_gradients():
    q, k, v, ld, s0 = _inputs(torch.float64, "token", n=45)
    a = _run(linear_attention_chunked, q, k, v, ld, s0, torch.float64, chunk_size=4,
             segment_chunks=2, recompute=True)
    b = _run(linear_attention_chunked, q, k, v, ld, s0, torch.float64, chunk_size=4,
             segment_chunks=2, recompute=False)
    for x, y in zip(a, b):
        assert _rel(x, y) <= 1e-12


@pytest.mark.parametrize("decay", ["none", "token"])
def test_split_with_carried_state_equals_one_pass(decay):
    """One pass == the sequence cut into pieces with the state carried over == token by token."""
    q, k, v, ld, s0 = _inputs(torch.float64, decay, n=41)
    o_all, s_all = linear_attention_chunked(q, k, v, log_decay=ld, initial_state=s0,
                                            return_final_state=True, chunk_size=8)
    cuts = [0, 1, 13, 14, 30, 41]
    state, outs = s0, []
    for a, b in zip(cuts[:-1], cuts[1:]):
        o, state = linear_attention_chunked(
            q[:, a:b], k[:, a:b], v[:, a:b],
            log_decay=ld[:, a:b] if ld is not None else None,
            initial_state=state, return_final_state=True, chunk_size=8,
        )
        outs.append(o)
    assert _rel(torch.cat(outs, 1), o_all) <= 1e-12 and _rel(state, s_all) <= 1e-12
    o_tok, s_tok = linear_attention_recurrent(q, k, v, log_decay=ld, initial_state=s0,
                                              return_final_state=True)
    assert _rel(o_all, o_tok) <= 1e-10 and _rel(s_all, s_tok) <= 1e-10


def test_strong_decay_stays_finite():
    """Log decays of -60 per token would overflow exp(-cumsum) in a naive cumulative form."""
    q, k, v, _, s0 = _inputs(torch.float32, "none", n=70)
    ld = torch.full((2, 70, 5), -60.0)
    ld[:, ::7] = -0.01
    o, S = linear_attention_chunked(q.float(), k.float(), v.float(), log_decay=ld,
                                    initial_state=s0.float(), return_final_state=True,
                                    chunk_size=32)
    r, Sr = linear_attention_recurrent(q, k, v, log_decay=ld.double(), initial_state=s0,
                                       return_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    assert _rel(o, r) <= 1e-5 and _rel(S, Sr) <= 1e-5


def test_default_scale_and_no_state():
    q, k, v, _, _ = _inputs(torch.float64, "none", n=9, dk=16)
    o = linear_attention(q, k, v)
    r = linear_attention_recurrent(q, k, v, scale=0.25)
    assert _rel(o, r) <= 1e-12


def test_dispatcher_paths(monkeypatch):
    q, k, v, ld, s0 = _inputs(torch.float64, "token", n=19)
    ref = linear_attention_recurrent(q, k, v, log_decay=ld, initial_state=s0)
    monkeypatch.setenv("CTXSCALE_KERNELS", "auto")
    for path in ("recurrent", "chunked"):
        monkeypatch.setenv("CTXSCALE_KERNELS_LINEAR_ATTENTION", path)
        assert _rel(linear_attention(q, k, v, log_decay=ld, initial_state=s0), ref) <= 1e-10
        assert dispatch.chosen_paths()["linear_attention"] == path
    monkeypatch.delenv("CTXSCALE_KERNELS_LINEAR_ATTENTION")
    linear_attention(q, k, v, log_decay=ld, initial_state=s0)  # CPU, auto: the PyTorch path
    assert dispatch.chosen_paths()["linear_attention"] == "chunked"
    monkeypatch.setenv("CTXSCALE_KERNELS_LINEAR_ATTENTION", "bogus")
    with pytest.raises(ValueError, match="CTXSCALE_KERNELS_LINEAR_ATTENTION='bogus' is not a path"):
        linear_attention(q, k, v)


def test_dispatcher_uses_triton_module_when_it_supports_the_call(monkeypatch):
    """The Triton module is called with the dispatcher's exact arguments when `supports` says
    yes, and the chunked path runs when it says no (a stand-in module; the real kernel is tested
    in its own file)."""
    import types

    la_module = importlib.import_module("ctxscale.kernels.linear_attention")

    calls = []
    fake = types.SimpleNamespace(
        supports=lambda q, k, v, **kw: kw["log_decay"] is not None,
        linear_attention=lambda q, k, v, **kw: calls.append(kw) or torch.zeros_like(v),
    )
    monkeypatch.setattr(la_module, "_triton_module", lambda: fake)
    monkeypatch.setattr(la_module, "want_triton", lambda device: True)
    monkeypatch.delenv("CTXSCALE_KERNELS_LINEAR_ATTENTION", raising=False)
    q, k, v, ld, _ = _inputs(torch.float64, "token", n=5)
    assert torch.equal(linear_attention(q, k, v, log_decay=ld), torch.zeros_like(v))
    assert set(calls[0]) == {"log_decay", "scale", "initial_state", "return_final_state",
                             "segments"}
    assert dispatch.chosen_paths()["linear_attention"] == "triton"
    ref = linear_attention_recurrent(q, k, v)
    assert _rel(linear_attention(q, k, v), ref) <= 1e-10  # unsupported: falls back
    assert dispatch.chosen_paths()["linear_attention"] == "chunked"
    monkeypatch.setattr(la_module, "_triton_module", lambda: None)
    assert _rel(linear_attention(q, k, v), ref) <= 1e-10  # module missing: falls back


def test_shape_errors_are_actionable():
    q, k, v, _, _ = _inputs(torch.float64, "none", n=6, h=3)
    with pytest.raises(ValueError, match="log_decay"):
        linear_attention(q, k, v, log_decay=torch.zeros(2, 6))
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention(q, k, v, initial_state=torch.zeros(2, 3, 7, 7))
    with pytest.raises(ValueError, match="same shape"):
        linear_attention(q, k[..., :5], v)
    with pytest.raises(ValueError, match="must divide"):  # 2 q/k heads for 3 heads of v
        linear_attention(q[:, :, :2], k[:, :, :2], v)
