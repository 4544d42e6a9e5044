"""Packed documents (`segments`) in kernels/linear_attention_triton.py: the kernel on a packed row
equals every document run alone (the float64 token-by-token oracle `linear_attention_recurrent`,
or the kernel itself without segments), the initial state feeding only the row's first document
and the final state being the last document's (semantics: kernels/recurrent_segments.py).

The interpreter runs chunks of 16 tokens, so the layouts below put document boundaries inside
chunks, exactly at chunk boundaries (16, 32, 48), and make documents shorter than a chunk (1 and
3 tokens) and sequences that are not a multiple of it (37, 100).

Tolerances (as in tests/kernels/test_linear_attention_triton.py): float32 against float64 is
1e-5 relative to the largest entry for o and the final state, 1e-4 for gradients (one more
reduction over the sequence). Where a mask only multiplies by an exact 1 or 0, results must be
bit-identical: a row without a change equals the kernel without segments, reused ids equal
distinct ids, and perturbing one document leaves every other document's outputs unchanged.
"""

import pytest
import torch

from ctxscale.kernels.linear_attention import linear_attention_recurrent
from ctxscale.kernels.linear_attention_triton import linear_attention as la_triton
from ctxscale.kernels.linear_attention_triton import supports
from ctxscale.kernels.recurrent_segments import runs

NAMES = ["o", "final_state", "dq", "dk", "dv", "dinitial_state", "dlog_decay"]


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def segments_of(lengths_per_row, ids=None):
    """(batch, seq) ids from document lengths per row; ids: one id list per row (default 0, 1, ..)."""
    rows = []
    for r, lens in enumerate(lengths_per_row):
        row_ids = torch.tensor(ids[r]) if ids is not None else torch.arange(len(lens))
        rows.append(torch.repeat_interleave(row_ids, torch.tensor(lens)))
    return torch.stack(rows)


# (lengths per row, n): boundaries inside chunks and at chunk boundaries, 1- and 3-token documents
LAYOUTS = {
    "n37": [[5, 20, 12], [1, 15, 16, 5]],  # row 0: at 5, 25 (docs cross chunks); row 1: 1, 16, 32
    "n100": [[16, 16, 3, 40, 25], [99, 1]],  # row 0: at 16, 32, 35, 75; row 1: 1-token last doc
}


def _inputs(decay, device, *, b=2, n=37, h=2, hk=None, dk=16, dv=8, seed=0):
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
    move = lambda t: t.to(device) if t is not None else None
    return move(q), move(k), move(v), move(ld), move(s0)


def _documents(seg_row):
    """(start, end) of every document of one row: a new one wherever the id changes."""
    r = runs(seg_row[None].cpu())[0]
    starts = [0] + (torch.nonzero(r[1:] != r[:-1]).flatten() + 1).tolist()
    return list(zip(starts, starts[1:] + [len(r)]))


def each_document_alone(fn, segments):
    """The oracle: `fn` (without segments) on every document of every row separately, outputs
    concatenated; the initial state goes to the row's first document only, the final state is
    the last document's."""

    def run(q, k, v, *, log_decay=None, initial_state=None, return_final_state=True):
        outs, finals = [], []
        for b in range(q.shape[0]):
            row = []
            for i, (s, e) in enumerate(_documents(segments[b])):
                ld = log_decay
                if ld is not None and ld.dim() == 3:
                    ld = ld[b:b + 1, s:e]
                s0 = initial_state[b:b + 1] if initial_state is not None and i == 0 else None
                o, state = fn(q[b:b + 1, s:e], k[b:b + 1, s:e], v[b:b + 1, s:e], log_decay=ld,
                              initial_state=s0, return_final_state=True)
                row.append(o)
            outs.append(torch.cat(row, 1))
            finals.append(state)
        return torch.cat(outs), torch.cat(finals)

    return run


def with_segments(segments):
    return lambda *a, **kw: la_triton(*a, segments=segments, **kw)


def _run(fn, q, k, v, ld, s0, dtype):
    """o, final state and the gradients (q, k, v, initial state, log decay) of a random loss."""
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ldl = ld.to(dtype).requires_grad_() if ld is not None else None
    s0l = s0.to(dtype).requires_grad_() if s0 is not None else None
    o, S = fn(*leaves, log_decay=ldl, initial_state=s0l, return_final_state=True)
    g = torch.Generator().manual_seed(1)
    wo = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.device, o.dtype)
    ws = torch.randn(S.shape, generator=g, dtype=torch.float64).to(S.device, S.dtype)
    ins = leaves + [t for t in (s0l, ldl) if t is not None]
    grads = torch.autograd.grad((o * wo).sum() + (S * ws).sum(), ins)
    return [o, S, *grads]


def _assert_close(out, ref):
    for name, a, r in zip(NAMES, out, ref):
        assert a.dtype == torch.float32 and a.shape == r.shape, name
        tol = 1e-5 if name in ("o", "final_state") else 1e-4
        assert _rel(a, r) <= tol, f"{name}: relative error {_rel(a, r):.2e} > {tol}"


@pytest.mark.parametrize("layout", ["n37", "n100"])
@pytest.mark.parametrize("decay", ["none", "head", "token"])
def test_packed_rows_match_each_document_alone(decay, layout, device):
    lengths = LAYOUTS[layout]
    seg = segments_of(lengths).to(device)
    q, k, v, ld, s0 = _inputs(decay, device, n=seg.shape[1])
    ref = _run(each_document_alone(linear_attention_recurrent, seg), q, k, v, ld, s0,
               torch.float64)
    out = _run(with_segments(seg), q, k, v, ld, s0, torch.float32)
    assert len(out) == len(ref) == (7 if ld is not None else 6)
    _assert_close(out, ref)


@pytest.mark.parametrize("decay,hk", [("token", 2), ("head", 1)])
def test_grouped_qk_with_segments(decay, hk, device):
    """4 heads reading hk heads of q/k: the oracle takes the same grouped inputs per document."""
    seg = segments_of(LAYOUTS["n37"]).to(device)
    q, k, v, ld, s0 = _inputs(decay, device, n=37, h=4, hk=hk, dk=8, dv=8, seed=3)
    ref = _run(each_document_alone(linear_attention_recurrent, seg), q, k, v, ld, s0,
               torch.float64)
    out = _run(with_segments(seg), q, k, v, ld, s0, torch.float32)
    _assert_close(out, ref)


def test_oracle_on_the_kernel_itself(device):
    """The kernel without segments on each document alone (no initial state: the output-only,
    no-final-state-gradient path) gives the same as one packed call."""
    seg = segments_of(LAYOUTS["n37"]).to(device)
    q, k, v, ld, _ = (t.float() if t is not None else None
                      for t in _inputs("token", device, n=37, seed=4))
    o = la_triton(q, k, v, log_decay=ld, segments=seg)
    o_ref, _ = each_document_alone(la_triton, seg)(q, k, v, log_decay=ld)
    assert _rel(o, o_ref) <= 1e-5


@pytest.mark.parametrize("decay", ["none", "token"])
def test_row_without_change_equals_plain_kernel(decay, device):
    """Rows whose id never changes (another constant per row): the same numbers, bit for bit,
    as the kernel without segments, gradients included."""
    n = 37
    q, k, v, ld, s0 = _inputs(decay, device, n=n, seed=5)
    seg = torch.tensor([[7] * n, [2] * n], device=device)
    out = _run(with_segments(seg), q, k, v, ld, s0, torch.float32)
    ref = _run(la_triton, q, k, v, ld, s0, torch.float32)
    for name, a, r in zip(NAMES, out, ref):
        assert torch.equal(a, r), name


def test_reused_ids_are_separate_documents(device):
    """Only changes between neighbours count: ids 0, 1, 0 are three documents, exactly like
    ids 0, 1, 2 (and int32 ids like int64 ones)."""
    lengths = [[10, 10, 17], [16, 16, 5]]
    reused = segments_of(lengths, ids=[[0, 1, 0], [4, 3, 4]]).to(device)
    distinct = segments_of(lengths).to(device)
    q, k, v, ld, s0 = _inputs("token", device, n=37, seed=6)
    out = _run(with_segments(reused), q, k, v, ld, s0, torch.float32)
    ref = _run(with_segments(distinct.int()), q, k, v, ld, s0, torch.float32)
    for name, a, r in zip(NAMES, out, ref):
        assert torch.equal(a, r), name
    oracle = _run(each_document_alone(linear_attention_recurrent, distinct), q, k, v, ld, s0,
                  torch.float64)
    _assert_close(out, oracle)


@pytest.mark.parametrize("decay", ["none", "token"])
def test_documents_do_not_leak(decay, device):
    """Large changes to one document's q, k, v, log decay (and to the initial state, which only
    the first document reads) leave every later document's outputs and the final state
    unchanged bit for bit: a masked product is an exact zero, and the within-chunk cumulative
    decay restarts at each document (a plain cumsum would carry the other document's decays
    into the exponents' rounding)."""
    lengths = [[5, 11, 21], [20, 3, 14]]
    seg = segments_of(lengths).to(device)
    q, k, v, ld, s0 = (t.float() if t is not None else None
                       for t in _inputs(decay, device, n=37, seed=7))
    o, S = la_triton(q, k, v, log_decay=ld, initial_state=s0, return_final_state=True,
                     segments=seg)
    g = torch.Generator().manual_seed(8)
    noise = lambda t: 50 * torch.randn(t.shape, generator=g).to(t.device)
    q2, k2, v2, s02 = q.clone(), k.clone(), v.clone(), s0 + noise(s0)
    ld2 = ld.clone() if ld is not None else None
    middle = [(5, 16), (20, 23)]  # row 0's and row 1's middle document
    for b, (s, e) in enumerate(middle):
        for t in (q2, k2, v2):
            t[b, s:e] += noise(t[b, s:e])
        if ld2 is not None:
            ld2[b, s:e] = -10 * torch.rand(e - s, ld.shape[-1], generator=g).to(device)
    o2, S2 = la_triton(q2, k2, v2, log_decay=ld2, initial_state=s02, return_final_state=True,
                       segments=seg)
    assert torch.equal(S2, S)
    first = [(0, 5), (0, 20)]
    for b in range(2):
        (s, e), (f0, f1) = middle[b], first[b]
        assert not torch.equal(o2[b, s:e], o[b, s:e])  # the perturbation did reach its document
        assert not torch.equal(o2[b, f0:f1], o[b, f0:f1])  # and the initial state the first
        assert torch.equal(o2[b, e:], o[b, e:]), f"row {b}: a later document changed"


def test_supports_and_bad_segments(device):
    q, k, v, _, _ = (t.float() if t is not None else None for t in _inputs("none", device, n=9))
    seg = torch.zeros(2, 9, dtype=torch.int64, device=device)
    assert supports(q, k, v, segments=seg) and supports(q, k, v, segments=seg.int())
    assert not supports(q, k, v, segments=seg.float())
    assert not supports(q, k, v, segments=seg[:, :5])
    with pytest.raises(ValueError, match="segments must be an int32 or int64"):
        la_triton(q, k, v, segments=seg[:1])
    with pytest.raises(ValueError, match="segments must be an int32 or int64"):
        la_triton(q, k, v, segments=seg.float())
