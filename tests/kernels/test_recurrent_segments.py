"""Document resets (`segments`) in the PyTorch recurrent kernels: linear attention (recurrent and
chunked), the selective scan (reference and chunked, both within-chunk forms, with and without
recomputation) and the causal conv1d (reference and F.conv1d paths).

Oracle: every document run alone through the path without segments, the initial state given to
the first document only, outputs concatenated; the final state is the last document's. float64
to 1e-10 (the same sums, masked terms are exact zeros), float32 forward 1e-5 and gradients 1e-4
relative.
"""

import importlib

import pytest
import torch

from ctxscale.kernels.recurrent_segments import runs

# the modules (ctxscale.kernels re-exports functions of the same names)
cv = importlib.import_module("ctxscale.kernels.conv1d")
la = importlib.import_module("ctxscale.kernels.linear_attention")
ss = importlib.import_module("ctxscale.kernels.selective_scan")

# row 0: documents of 10, 6, 16, 1 and 44 tokens (a one-token document; a start at 16 = a chunk
# boundary for chunks of 8); row 1: two documents whose ids are reused later (0, 1, 0)
N = 77


def _ids():
    ids = torch.zeros(2, N, dtype=torch.int64)
    ids[0, 10:], ids[0, 16:], ids[0, 32:], ids[0, 33:] = 1, 2, 5, 6
    ids[1, 40:], ids[1, 64:] = 1, 0
    return ids


def _bounds(row_ids):
    starts = [0] + [t for t in range(1, len(row_ids)) if row_ids[t] != row_ids[t - 1]]
    return list(zip(starts, starts[1:] + [len(row_ids)]))


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_runs_count_changes_between_neighbours():
    ids = torch.tensor([[3, 3, 7, 7, 3, 9], [0, 0, 0, 0, 0, 0]])
    assert runs(ids).tolist() == [[0, 0, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0]]


# ---------------------------------------------------------------- linear attention
def _la_inputs(dtype, decay, hk=2, h=4):
    g = torch.Generator().manual_seed(0)
    b, dk, dv = 2, 5, 6
    q = torch.randn(b, N, hk, dk, generator=g, dtype=dtype)
    k = torch.randn(b, N, hk, dk, generator=g, dtype=dtype)
    v = torch.randn(b, N, h, dv, generator=g, dtype=dtype)
    s0 = torch.randn(b, h, dk, dv, generator=g, dtype=dtype)
    log_decay = {"none": None, "head": -torch.rand(h, generator=g, dtype=dtype),
                 "token": -torch.rand(b, N, h, generator=g, dtype=dtype)}[decay]
    return [t.requires_grad_() if t is not None else None for t in (q, k, v, log_decay, s0)]


def _la_alone(q, k, v, log_decay, s0, ids):
    outs, finals = [], []
    for row in range(q.shape[0]):
        parts, state = [], s0[row:row + 1]
        for i, (a, e) in enumerate(_bounds(ids[row])):
            g = None
            if log_decay is not None:
                g = log_decay if log_decay.dim() == 1 else log_decay[row:row + 1, a:e]
            o, state = la.linear_attention_recurrent(
                q[row:row + 1, a:e], k[row:row + 1, a:e], v[row:row + 1, a:e], log_decay=g,
                initial_state=state if i == 0 else None, return_final_state=True)
            parts.append(o)
        outs.append(torch.cat(parts, 1))
        finals.append(state)
    return torch.cat(outs), torch.cat(finals)


LA_PATHS = {
    "recurrent": la.linear_attention_recurrent,
    "chunked": lambda *a, **kw: la.linear_attention_chunked(*a, chunk_size=8, segment_chunks=2,
                                                            **kw),
    "chunked-recompute": lambda *a, **kw: la.linear_attention_chunked(
        *a, chunk_size=8, segment_chunks=2, recompute=True, **kw),
    "chunked-default": la.linear_attention_chunked,
}


@pytest.mark.parametrize("path", list(LA_PATHS))
@pytest.mark.parametrize("decay", ["none", "head", "token"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_linear_attention_documents_equal_separate_runs(path, decay, dtype):
    q, k, v, log_decay, s0 = _la_inputs(dtype, decay)
    ids = _ids()
    o, s = LA_PATHS[path](q, k, v, log_decay=log_decay, initial_state=s0,
                          return_final_state=True, segments=ids)
    ro, rs = _la_alone(q, k, v, log_decay, s0, ids)
    tol_f, tol_g = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    assert _rel(o, ro) <= tol_f and _rel(s, rs) <= tol_f
    wo, ws = torch.randn_like(o), torch.randn_like(s)
    inputs = [t for t in (q, k, v, log_decay, s0) if t is not None]
    got = torch.autograd.grad((o * wo).sum() + (s * ws).sum(), inputs)
    want = torch.autograd.grad((ro * wo).sum() + (rs * ws).sum(), inputs)
    for a, b in zip(got, want):
        assert _rel(a, b) <= tol_g


def test_linear_attention_without_changes_equals_plain():
    q, k, v, log_decay, s0 = _la_inputs(torch.float64, "token")
    same = torch.full((2, N), 4, dtype=torch.int32)
    a = la.linear_attention(q, k, v, log_decay=log_decay, initial_state=s0, segments=same)
    b = la.linear_attention(q, k, v, log_decay=log_decay, initial_state=s0)
    assert torch.equal(a, b)


def test_linear_attention_documents_are_isolated():
    """Changing one document's values changes no other document's outputs."""
    q, k, v, log_decay, _ = _la_inputs(torch.float32, "token")
    ids = _ids()
    o = la.linear_attention(q, k, v, log_decay=log_decay, segments=ids)
    v2 = v.detach().clone()
    v2[0, 16:32] += 100.0
    o2 = la.linear_attention(q, k, v2, log_decay=log_decay, segments=ids)
    changed = (o2 - o).abs().amax((2, 3)) > 0
    assert changed[0, 16:32].all()
    assert not changed[0, :16].any() and not changed[0, 32:].any() and not changed[1].any()


# ---------------------------------------------------------------- selective scan
def _ss_inputs(dtype, grouped):
    g = torch.Generator().manual_seed(1)
    b, d, n = 2, 4, 3
    u = torch.randn(b, d, N, generator=g, dtype=dtype)
    delta = torch.randn(b, d, N, generator=g, dtype=dtype)
    A = -torch.rand(d, n, generator=g, dtype=dtype) * 3
    shape = (b, 2, n, N) if grouped else (b, n, N)
    B = torch.randn(*shape, generator=g, dtype=dtype)
    C = torch.randn(*shape, generator=g, dtype=dtype)
    D = torch.randn(d, generator=g, dtype=dtype)
    z = torch.randn(b, d, N, generator=g, dtype=dtype)
    bias = torch.randn(d, generator=g, dtype=dtype)
    x0 = torch.randn(b, d, n, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias, x0)]


def _ss_alone(u, delta, A, B, C, D, z, bias, x0, ids):
    outs, finals = [], []
    for row in range(u.shape[0]):
        parts, x = [], x0[row:row + 1]
        for i, (a, e) in enumerate(_bounds(ids[row])):
            o, x = ss.selective_scan_reference(
                u[row:row + 1, :, a:e], delta[row:row + 1, :, a:e], A, B[row:row + 1, ..., a:e],
                C[row:row + 1, ..., a:e], D, z[row:row + 1, :, a:e], bias, True, True,
                initial_state=x if i == 0 else None)
            parts.append(o)
        outs.append(torch.cat(parts, -1))
        finals.append(x)
    return torch.cat(outs), torch.cat(finals)


def _chunked(**kw):
    return lambda *a, **k2: ss.selective_scan_chunked(*a, **kw, **k2)


SS_PATHS = {
    "reference": ss.selective_scan_reference,
    "chunked-cumsum": _chunked(chunk_size=8, segment_chunks=2, recompute=False),
    "chunked-cumsum-recompute": _chunked(chunk_size=8, segment_chunks=2, recompute=True),
    "chunked-masked": _chunked(chunk_size=8, segment_chunks=2, cumsum_limit=0),
    "chunked-adaptive-recompute": _chunked(chunk_size=8, segment_chunks=2, cumsum_limit=0.5,
                                           recompute=True),
    "chunked-default": ss.selective_scan_chunked,
}


@pytest.mark.parametrize("path", list(SS_PATHS))
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_selective_scan_documents_equal_separate_runs(path, grouped, dtype):
    inputs = _ss_inputs(dtype, grouped)
    u, delta, A, B, C, D, z, bias, x0 = inputs
    ids = _ids()
    o, x = SS_PATHS[path](u, delta, A, B, C, D, z, bias, True, True, initial_state=x0,
                          segments=ids)
    ro, rx = _ss_alone(*inputs, ids)
    tol_f, tol_g = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    assert _rel(o, ro) <= tol_f and _rel(x, rx) <= tol_f
    wo, wx = torch.randn_like(o), torch.randn_like(x)
    got = torch.autograd.grad((o * wo).sum() + (x * wx).sum(), inputs)
    want = torch.autograd.grad((ro * wo).sum() + (rx * wx).sum(), inputs)
    for a, b in zip(got, want):
        assert _rel(a, b) <= tol_g


def test_selective_scan_documents_without_autograd():
    inputs = [t.detach() for t in _ss_inputs(torch.float64, True)]
    ids = _ids()
    with torch.no_grad():
        o = ss.selective_scan_chunked(*inputs[:8], True, initial_state=inputs[8], segments=ids,
                                      chunk_size=8, segment_chunks=2)
        ro, _ = _ss_alone(*inputs, ids)
    assert _rel(o, ro) <= 1e-10


# ---------------------------------------------------------------- causal conv1d
def _short_tail_ids():
    """Last documents of 1 and 2 tokens: shorter than the conv state (width − 1 = 3)."""
    ids = _ids()
    ids[0, N - 1:], ids[1, N - 2:] = 9, 9
    return ids


@pytest.mark.parametrize("ids_of", [_ids, _short_tail_ids])
@pytest.mark.parametrize("path", ["reference", "torch"])
def test_conv1d_documents_equal_separate_runs(path, ids_of):
    g = torch.Generator().manual_seed(2)
    b, d, w = 2, 3, 4
    x = torch.randn(b, d, N, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(d, w, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(d, generator=g, dtype=torch.float64, requires_grad=True)
    s0 = torch.randn(b, d, w - 1, generator=g, dtype=torch.float64, requires_grad=True)
    ids = ids_of()
    fn = {"reference": cv.causal_conv1d_reference, "torch": cv.causal_conv1d_torch}[path]
    o, s = fn(x, weight, bias, activation="silu", initial_state=s0, return_final_state=True,
              segments=ids)
    outs, finals = [], []
    for row in range(b):
        parts, st = [], s0[row:row + 1]
        for i, (a, e) in enumerate(_bounds(ids[row])):
            y, st = cv.causal_conv1d_reference(x[row:row + 1, :, a:e], weight, bias,
                                               activation="silu", return_final_state=True,
                                               initial_state=st if i == 0 else None)
            parts.append(y)
        outs.append(torch.cat(parts, -1))
        finals.append(st)
    ro, rs = torch.cat(outs), torch.cat(finals)
    assert _rel(o, ro) <= 1e-12 and _rel(s, rs) <= 1e-12
    wo = torch.randn_like(o)
    inputs = (x, weight, bias, s0)
    got = torch.autograd.grad((o * wo).sum() + s.sum(), inputs)
    want = torch.autograd.grad((ro * wo).sum() + rs.sum(), inputs)
    for a, b_ in zip(got, want):
        assert _rel(a, b_) <= 1e-12


def test_conv1d_state_carried_within_a_document():
    """Two pieces cut inside a document, the final state carried, equal one pass."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, N, generator=g, dtype=torch.float64)
    weight = torch.randn(3, 4, generator=g, dtype=torch.float64)
    ids = _ids()
    whole = cv.causal_conv1d(x, weight, segments=ids)
    cut = 50  # inside row 0's last document and row 1's second
    first, state = cv.causal_conv1d(x[..., :cut], weight, segments=ids[:, :cut],
                                    return_final_state=True)
    second = cv.causal_conv1d(x[..., cut:], weight, segments=ids[:, cut:], initial_state=state)
    assert _rel(torch.cat([first, second], -1), whole) <= 1e-12


# ---------------------------------------------------------------- errors and dispatch
@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, N), "int32 or int64"),
    (torch.zeros(2, N - 1, dtype=torch.int64), r"\(batch, seq\) = \(2, 77\)"),
    ([0] * N, "got a list"),
])
def test_bad_segments_are_refused(bad, match):
    q, k, v, _, _ = _la_inputs(torch.float32, "none")
    with pytest.raises(ValueError, match=match):
        la.linear_attention(q, k, v, segments=bad)
    u, delta, A, B, C, *_ = _ss_inputs(torch.float32, False)
    with pytest.raises(ValueError, match=match):
        ss.selective_scan(u, delta, A, B, C, segments=bad)
    with pytest.raises(ValueError, match=match):
        cv.causal_conv1d(u, torch.ones(4, 3), segments=bad)


def test_vendor_kernels_are_not_used_with_segments(monkeypatch):
    """mamba-ssm's scan and causal-conv1d have no document resets: forcing them with segments
    is an error that names the fix."""
    u, delta, A, B, C, *_ = _ss_inputs(torch.float32, False)
    ids = _ids()
    monkeypatch.setenv("CTXSCALE_KERNELS_SELECTIVE_SCAN", "mamba_ssm")
    with pytest.raises(RuntimeError, match="no segments"):
        ss.selective_scan(u, delta, A, B, C, segments=ids)
    monkeypatch.setenv("CTXSCALE_KERNELS_CONV1D", "causal_conv1d")
    with pytest.raises(RuntimeError, match="no segments"):
        cv.causal_conv1d(u, torch.ones(4, 3), segments=ids)


def test_dispatchers_hand_segments_to_the_triton_kernels(monkeypatch):
    """Forced Triton paths (the interpreter here) take the document ids and agree with the
    chunked PyTorch paths."""
    q, k, v, log_decay, s0 = (t.detach() for t in _la_inputs(torch.float32, "token"))
    ids = _ids()
    want = la.linear_attention_chunked(q, k, v, log_decay=log_decay, initial_state=s0,
                                       segments=ids)
    monkeypatch.setenv("CTXSCALE_KERNELS_LINEAR_ATTENTION", "triton")
    got = la.linear_attention(q, k, v, log_decay=log_decay, initial_state=s0, segments=ids)
    assert _rel(got, want) <= 1e-5
    inputs = [t.detach() for t in _ss_inputs(torch.float32, True)]
    want = ss.selective_scan_chunked(*inputs[:8], True, initial_state=inputs[8], segments=ids)
    monkeypatch.setenv("CTXSCALE_KERNELS_SELECTIVE_SCAN", "triton")
    got = ss.selective_scan(*inputs[:8], True, initial_state=inputs[8], segments=ids)
    assert _rel(got, want) <= 1e-5
