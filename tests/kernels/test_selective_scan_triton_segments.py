"""Document resets (packed sequences) in kernels/selective_scan_triton.py.

Oracle: every document of every row run alone through the token-by-token float64
`selective_scan_reference` (no segments), outputs concatenated; `initial_state` goes to the row's
first document only and the last state is the last document's (`kernels/recurrent_segments.py`).
Document boundaries are placed at the kernel's chunk boundaries (T tokens) and next to them,
with 1-token documents and lengths that are not multiples of T.

Tolerances as in test_selective_scan_triton.py: the kernel is the exact recurrence in float32
(a reset replaces a_t by 0, which the parallel scan applies exactly), so out and last_state agree
with float64 to ~1e-6 relative (asserted 1e-5); gradients add one reduction over tokens and
channels (asserted 1e-4). Isolation is exact: 0 · x_{t-1} = 0 for any finite state, so the
other documents' outputs and gradients are compared bitwise.
"""

import pytest
import torch

from ctxscale.kernels.recurrent_segments import runs
from ctxscale.kernels.selective_scan import selective_scan_reference
from ctxscale.kernels.selective_scan_triton import _blocks, supports
from ctxscale.kernels.selective_scan_triton import selective_scan as ss_triton

NAMES = ["out", "last_state", "du", "ddelta", "dA", "dB", "dC", "dD", "dz", "ddelta_bias",
         "dinitial_state"]
LEAVES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
DIM, DSTATE = 6, 5
T = _blocks(2, DSTATE)[1]  # the kernel's chunk (16 tokens in the interpreter)
L = 2 * T + 13  # 45 in the interpreter: not a multiple of the chunk


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _ids(lengths):
    """Document ids 0, 1, 2, ... for documents of the given lengths."""
    assert sum(lengths) == L
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))


# (form of B/C, D z bias softplus?, ids dtype, row 0 ids, row 1 ids)
CASES = {
    # boundaries exactly at the chunk boundaries T and 2T, two 1-token documents; row 1 has no change
    "grouped-chunk-boundaries": ("grouped", True, torch.int32, _ids([5, T - 5, 1, 1, T - 2, 13]), _ids([L])),
    # first and last documents of 1 token, a document spanning two chunk boundaries
    "plain-bare-1token-ends": ("plain", False, torch.int64, _ids([1, 2 * T, 11, 1]), _ids([T + 3, T - 3, 13])),
    # reused ids: [0, 0, 1, 1, 0, 0, ...] is a new document every 2 (row 0) or 7 (row 1) tokens
    "plain-reused-ids": ("plain", True, torch.int64, (torch.arange(L) // 2) % 2, (torch.arange(L) // 7) % 2),
    # grouped B/C without D, z, bias, softplus; a document start one token after a chunk start
    "grouped-bare": ("grouped", False, torch.int32, _ids([T + 1, T, 12]), _ids([2, 2 * T + 11])),
}


def _inputs(form, device, *, b=2, d=DIM, n=DSTATE, seed=0):
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


def _leaves(inputs, dtype, full):
    x = {k: v.to(torch.float32 if k == "initial_state" and dtype != torch.float64 else dtype)
         .requires_grad_() for k, v in inputs.items()}
    if not full:
        x["D"] = x["z"] = x["delta_bias"] = None
    return x


def _per_document(x, segments, full):
    """The oracle: each document of each row alone through the reference, in float64."""
    outs, lasts = [], []
    doc = runs(segments)
    for row in range(segments.shape[0]):
        pieces, state = [], x["initial_state"][row:row + 1]
        for k in range(int(doc[row].max()) + 1):
            where = (doc[row] == k).nonzero().flatten()
            s, e = int(where[0]), int(where[-1]) + 1
            sl = lambda t, row=row, s=s, e=e: None if t is None else t[row:row + 1, ..., s:e]
            out, last = selective_scan_reference(
                sl(x["u"]), sl(x["delta"]), x["A"], sl(x["B"]), sl(x["C"]), x["D"], sl(x["z"]),
                x["delta_bias"], full, True, initial_state=state)
            pieces.append(out)
            state = None  # only the first document starts from initial_state
        outs.append(torch.cat(pieces, dim=-1))
        lasts.append(last)
    return torch.cat(outs), torch.cat(lasts)


def _kernel(x, segments, full):
    return ss_triton(*(x[k] for k in LEAVES[:8]), full, True, initial_state=x["initial_state"],
                     segments=segments)


def _with_grads(out, last, x):
    g = torch.Generator().manual_seed(1)
    wo = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.device, out.dtype)
    ws = torch.randn(last.shape, generator=g, dtype=torch.float64).to(last.device, last.dtype)
    leaves = [x[k] for k in LEAVES]
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((out * wo).sum() + (last * ws).sum(), present))
    return [out, last] + [next(grads) if t is not None else None for t in leaves]


@pytest.mark.parametrize("case", list(CASES))
def test_segments_match_per_document_reference(case, device):
    form, full, id_dtype, row0, row1 = CASES[case]
    segments = torch.stack([row0, row1]).to(device, id_dtype)
    inputs = _inputs(form, device)
    xr = _leaves(inputs, torch.float64, full)
    ref = _with_grads(*_per_document(xr, segments, full), xr)
    xk = _leaves(inputs, torch.float32, full)
    got = _with_grads(*_kernel(xk, segments, full), xk)
    assert got[0].dtype == torch.float32 and got[1].shape == (2, DIM, DSTATE)
    for name, a, r in zip(NAMES, got, ref):
        if r is None:
            assert a is None, name
            continue
        tol = 1e-5 if name in ("out", "last_state") else 1e-4
        assert a.shape == r.shape and _rel(a, r) <= tol, (name, _rel(a, r))


def test_no_change_equals_plain_kernel(device):
    """Constant ids (any value) are one document: the same numbers as segments=None."""
    inputs = _inputs("grouped", device, seed=3)
    segments = torch.full((2, L), 7, dtype=torch.int64, device=device)
    xs = _leaves(inputs, torch.float32, True)
    with_ids = _with_grads(*_kernel(xs, segments, True), xs)
    xp = _leaves(inputs, torch.float32, True)
    plain = _with_grads(*_kernel(xp, None, True), xp)
    for name, a, p in zip(NAMES, with_ids, plain):
        assert torch.equal(a, p), name


@pytest.mark.parametrize("doc", [0, 2])
def test_documents_are_isolated(doc, device):
    """Perturbing one document's u changes no other document's output; the gradient of one
    document's output reaches no other document (nor initial_state unless it is the first)."""
    lengths = [T - 3, 3, T + 1, 1, 11]  # starts 0, T - 3, T, 2T + 1, 2T + 2
    segments = torch.stack([_ids(lengths), _ids([L])]).to(device)
    inputs = {k: v.float() for k, v in _inputs("plain", device, seed=5).items()}
    mine = runs(segments)[0] == doc
    args = [inputs[k] for k in LEAVES[:8]]
    out, last = ss_triton(*args, True, True, initial_state=inputs["initial_state"],
                          segments=segments)
    u2 = inputs["u"].clone()
    u2[0, :, mine] += 1.0
    out2, last2 = ss_triton(u2, *args[1:], True, True, initial_state=inputs["initial_state"],
                            segments=segments)
    assert not torch.equal(out[0][:, mine], out2[0][:, mine])
    assert torch.equal(out[0][:, ~mine], out2[0][:, ~mine]) and torch.equal(out[1], out2[1])
    assert torch.equal(last, last2)  # the last state is the last document's

    x = _leaves(inputs, torch.float32, True)
    out = ss_triton(*(x[k] for k in LEAVES[:8]), True, initial_state=x["initial_state"],
                    segments=segments)
    du, dz, dx0 = torch.autograd.grad(out[0][:, mine].sum(), [x["u"], x["z"], x["initial_state"]])
    assert du[0][:, mine].abs().amax() > 0 and (du[0][:, ~mine] == 0).all() and (du[1] == 0).all()
    assert (dz[0][:, ~mine] == 0).all()
    assert (dx0[0].abs().amax() > 0) == (doc == 0) and (dx0[1] == 0).all()


def test_supports_and_checks_segments(device):
    x = {k: v.float() for k, v in _inputs("plain", device).items()}
    args = [x[k] for k in ("u", "delta", "A", "B", "C")]
    good = torch.zeros(2, L, dtype=torch.int32, device=device)
    assert supports(*args, segments=good)
    assert not supports(*args, segments=good.float())
    assert not supports(*args, segments=good[:, :-1])
    with pytest.raises(ValueError, match="segments must be an int32 or int64"):
        ss_triton(*args, segments=good[:1])
