"""Document (segment) masking in kernels/attention.py: the reference equals attention run on each
document alone, and the tiled paths (PyTorch tiles in float64, the fused CPU kernel per tile in
float32) equal the reference, including ring-step blocks (seq_q != seq_k, rows that see no key),
the in-place merge and the backward with a global lse.

Tolerances: float64 paths 1e-10 (the same sums in another order); float32 against the float64
reference 1e-5 for o and lse, 1e-4 for gradients, relative to the largest entry (as in
tests/kernels/test_attention.py).
"""

import pytest
import torch

from ctxscale.kernels import dispatch
from ctxscale.kernels.attention import (
    _tile_pairs,
    attention,
    attention_backward,
    attention_backward_into,
    attention_blockwise,
    attention_forward,
    attention_forward_merge,
    attention_reference,
)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def segments_of(lengths_per_row):
    return torch.stack([torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
                        for lens in lengths_per_row])


LENGTHS = [[7, 1, 20, 17], [30, 15]]  # 45 tokens; a 1-token document; unequal rows
SEG = segments_of(LENGTHS)


def _qkv(n=45, h=4, hk=2, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, n, x, d, generator=g, dtype=torch.float64) for x in (h, hk, hk)]


@pytest.mark.parametrize("causal", [True, False])
def test_reference_equals_each_document_alone(causal):
    q, k, v = _qkv()
    o, lse = attention_reference(q, k, v, causal=causal, q_segments=SEG, k_segments=SEG)
    for b, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            sl = slice(start, start + n)
            od, ld = attention_reference(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl],
                                         causal=causal)
            assert _rel(o[b:b + 1, sl], od) <= 1e-12 and _rel(lse[b:b + 1, :, sl], ld) <= 1e-12
            start += n


def _grads(fn, q, k, v, dtype, use_lse):
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    o, lse = fn(*leaves)
    g = torch.Generator().manual_seed(5)
    w = torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)
    loss = (o * w).sum() + (lse.sum() if use_lse else 0)
    return [o, lse, *torch.autograd.grad(loss, leaves)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("use_lse", [True, False])
def test_tiled_paths_match_the_reference(dtype, causal, use_lse):
    """Tiles of 16 over 45 tokens: skipped, partially masked and boundary-crossing tile pairs.
    float32 on CPU runs the fused CPU kernel per tile pair (without an lse gradient) and the
    PyTorch tiles otherwise; float64 the PyTorch tiles."""
    q, k, v = _qkv()
    seg = dict(q_segments=SEG, k_segments=SEG)
    ref = _grads(lambda *t: attention_reference(*t, causal=causal, **seg), q, k, v,
                 torch.float64, use_lse)
    got = _grads(lambda *t: attention_blockwise(*t, causal=causal, block_size=16, **seg),
                 q, k, v, dtype, use_lse)
    if dtype == torch.float32:
        assert dispatch.chosen_paths()["attention_block"] == "cpu_flash_tiles"
    tol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    for name, a, r in zip(["o", "lse", "dq", "dk", "dv"], got, ref):
        assert a.shape == r.shape
        assert _rel(a, r) <= tol[name not in ("o", "lse")], (name, _rel(a, r))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_ring_step_blocks_with_rows_that_see_nothing(dtype):
    """A ring block: queries 20..44 against keys 0..19, non-causal, where the second row's
    queries share no document with those keys. Rows without keys give o 0 and lse -inf, and the
    merge of the two key blocks and the per-block backward with the global (o, lse) equal the
    reference over all keys."""
    q, k, v = _qkv()
    ref_o, ref_lse = attention_reference(q, k, v, causal=True, q_segments=SEG, k_segments=SEG)
    rows = slice(20, 45)
    qs = SEG[:, rows]
    blocks = [(slice(0, 20), False), (slice(20, 45), True)]
    o0, l0 = attention_forward(q[:, rows].to(dtype), k[:, :20].to(dtype), v[:, :20].to(dtype),
                               causal=False, block_size=16, q_segments=qs, k_segments=SEG[:, :20])
    seen = (qs[:, :, None] == SEG[:, None, :20]).any(-1)  # (2, 25): a document began before 20
    assert (~seen).sum() == 32 and seen.sum() == 18  # queries 28.. and 30.. see none of them
    assert torch.equal(torch.isinf(l0), (~seen)[:, None].expand_as(l0))
    assert (o0.transpose(1, 2)[~seen[:, None].expand(2, 4, 25)] == 0).all()
    out = torch.zeros(2, 25, 4, 24, dtype=o0.dtype)
    lse = torch.full((2, 4, 25), float("-inf"), dtype=o0.dtype)
    for cols, causal in blocks:
        attention_forward_merge(q[:, rows].to(dtype), k[:, cols].to(dtype), v[:, cols].to(dtype),
                                out, lse, causal=causal, block_size=16, q_segments=qs,
                                k_segments=SEG[:, cols])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    assert _rel(out, ref_o[:, rows]) <= tol and _rel(lse, ref_lse[:, :, rows]) <= tol
    # backward over the two key blocks with the global o and lse = the reference's gradients
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o_full, _ = attention_reference(*leaves, causal=True, q_segments=SEG, k_segments=SEG)
    do = torch.randn(o_full.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    (o_full[:, rows] * do[:, rows]).sum().backward()
    dq = torch.zeros(2, 25, 4, 24, dtype=o0.dtype)
    dk, dv = torch.zeros(2, 45, 2, 24, dtype=o0.dtype), torch.zeros(2, 45, 2, 24, dtype=o0.dtype)
    for cols, causal in blocks:
        _, dk_b, dv_b = attention_backward_into(
            do[:, rows].to(dtype), q[:, rows].to(dtype), k[:, cols].to(dtype),
            v[:, cols].to(dtype), out.to(dtype), lse, (dq, None, None), causal=causal,
            block_size=16, q_segments=qs, k_segments=SEG[:, cols])
        dk[:, cols] += dk_b
        dv[:, cols] += dv_b
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for name, a, r in (("dq", dq, leaves[0].grad[:, rows]), ("dk", dk, leaves[1].grad),
                       ("dv", dv, leaves[2].grad)):
        assert torch.isfinite(a).all() and _rel(a, r) <= tol, (name, _rel(a, r))


def test_backward_of_a_block_whose_rows_see_nothing_is_zero():
    q, k, v = _qkv()
    qs, ks = torch.full((2, 45), 1), torch.zeros(2, 45, dtype=torch.long)
    o, lse = attention_forward(q.float(), k.float(), v.float(), causal=False, q_segments=qs,
                               k_segments=ks)
    assert torch.isinf(lse).all() and (o == 0).all()
    grads = attention_backward(torch.ones_like(o), q.float(), k.float(), v.float(), o, lse,
                               causal=False, q_segments=qs, k_segments=ks)
    assert all(torch.isfinite(g).all() and (g == 0).all() for g in grads)


def test_tiles_between_documents_are_skipped():
    """Nine documents of 16 tokens over 144: with 16-token tiles only the 9 diagonal pairs
    remain (causal or not), against 45 causal pairs without segments."""
    seg = torch.arange(144).div(16, rounding_mode="floor")[None]
    assert len(_tile_pairs(144, 144, 16, True, 0)) == 45
    for causal in (True, False):
        pairs = _tile_pairs(144, 144, 16, causal, 0, seg, seg)
        assert [(p[0], p[2]) for p in pairs] == [(16 * i, 16 * i) for i in range(9)]


def test_dispatcher_and_errors(monkeypatch):
    q, k, v = (t.float() for t in _qkv(n=9))
    seg = torch.zeros(2, 9, dtype=torch.long)
    o = attention(q, k, v, q_segments=seg, k_segments=seg)  # one document: plain causal
    assert _rel(o, attention_reference(q, k, v)[0]) <= 1e-5
    assert dispatch.chosen_paths()["attention"] == "blockwise"
    with pytest.raises(ValueError, match="needs both q_segments and k_segments"):
        attention(q, k, v, q_segments=seg)
    with pytest.raises(ValueError, match=r"integer tensor of shape \(batch, seq\) = \(2, 9\)"):
        attention(q, k, v, q_segments=seg[:, :5], k_segments=seg)
    with pytest.raises(ValueError, match="integer tensor"):
        attention(q, k, v, q_segments=seg.float(), k_segments=seg)
    monkeypatch.setenv("CTXSCALE_KERNELS_ATTENTION", "sdpa")
    with pytest.raises(ValueError, match="no document"):
        attention(q, k, v, q_segments=seg, k_segments=seg)
    monkeypatch.setenv("CTXSCALE_KERNELS_ATTENTION", "reference")
    assert _rel(attention(q, k, v, q_segments=seg, k_segments=seg), o) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tile_pairs_inside_one_document_run_without_the_document_mask(dtype):
    """Documents of 40 and 8 tokens, 16-token tiles: the pairs inside the first document are
    plain ('full' below the diagonal, 'partial' = causal only on it; the fused CPU kernel runs
    those without a mask, the diagonal with its own causal flag), the pairs that touch the
    boundary take the document mask, and the results still equal the reference."""
    seg = segments_of([[40, 8]])
    pairs = {(p[0], p[2]): p[4] for p in _tile_pairs(48, 48, 16, True, 0, seg, seg)}
    assert pairs == {(0, 0): "partial", (16, 0): "full", (16, 16): "partial",
                     (32, 0): "segments", (32, 16): "segments", (32, 32): "segments"}
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 48, n, 24, generator=g, dtype=torch.float64) for n in (4, 2, 2))
    kw = dict(q_segments=seg, k_segments=seg)
    ref = _grads(lambda *t: attention_reference(*t, causal=True, **kw), q, k, v, torch.float64,
                 False)
    got = _grads(lambda *t: attention_blockwise(*t, causal=True, block_size=16, **kw), q, k, v,
                 dtype, False)
    tol = (1e-10, 1e-10) if dtype == torch.float64 else (1e-5, 1e-4)
    for name, a, r in zip(["o", "lse", "dq", "dk", "dv"], got, ref):
        assert _rel(a, r) <= tol[name not in ("o", "lse")], (name, _rel(a, r))
