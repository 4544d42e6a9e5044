"""kernels/flash_attention_triton.py against the float64 full-score `attention_reference`.

Runs under the Triton interpreter on CPU (see conftest.py) at small odd shapes, or on a GPU.
Tolerances: the kernel is the exact algorithm in float32 (float32 inputs, IEEE dot products); its
online-softmax rescaling and tile-order summation give O(eps_32 · log(tiles)) relative error, so
outputs agree with float64 to ~1e-6; we assert 1e-5 for o/lse and 1e-4 relative (to the largest
entry) for gradients, whose longer reduction chains (sums over seq of products) lose a little more.
"""

import pytest
import torch

from ctxscale.kernels.attention import attention, attention_reference
from ctxscale.kernels.flash_attention_triton import (
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
    supports,
)

SHAPES = [  # (seq_q, seq_k, heads, kv_heads, head_dim)
    (37, 37, 5, 5, 24),  # padded head dim, odd seq
    (20, 45, 6, 2, 40),  # GQA, seq_q < seq_k (causal: bottom-right), padded 40 -> 64
    (45, 20, 6, 3, 64),  # seq_q > seq_k: the first causal rows see no key (lse = -inf)
]


def _inputs(sq, sk, h, hk, d, device, seed=0, batch=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, sq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(batch, sk, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(batch, sk, hk, d, generator=g, dtype=torch.float64)
    return q.to(device), k.to(device), v.to(device)


def _rel_close(a, b, tol):
    err = (a.double() - b.double()).abs().max().item()
    scale = max(b.double().abs().max().item(), 1e-30)
    assert err <= tol * scale, f"max error {err:.3e} > {tol} x {scale:.3e}"


def _loss(o, lse, w, wl):
    fin = torch.isfinite(lse)
    return (o.double() * w).sum() + (torch.where(fin, lse.double(), 0) * wl).sum()


@pytest.fixture(params=[(16, 16), (16, 32), (32, 16)], ids=lambda t: f"tiles{t[0]}x{t[1]}")
def tiles(request, monkeypatch, device):
    """Interpreter tiles (BLOCK_M, BLOCK_N): the GPU configs have BLOCK_M != BLOCK_N, where the
    causal bounds of the masked and unmasked tile ranges differ from the square case."""
    if device.type == "cpu":  # on a GPU the autotuned configs set the tiles
        import ctxscale.kernels.flash_attention_triton as fat

        monkeypatch.setattr(fat, "INTERPRET_TILES", request.param)
    return request.param


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_flash_attention_matches_reference(shape, causal, device, tiles):
    q64, k64, v64 = (t.requires_grad_() for t in _inputs(*shape, device))
    _check_against_reference(q64, k64, v64, causal, device)


def _check_against_reference(q64, k64, v64, causal, device, q_ids=None, k_ids=None):
    """flash_attention (float32, with document ids when given) against the float64 reference:
    o, lse (float32, -inf exactly where the reference has it), dq, dk, dv; no NaN anywhere and
    zero output and dq for rows that see nothing. Returns those rows `(batch, seq_q)`."""
    seg = {} if q_ids is None else {"q_segments": q_ids, "k_segments": k_ids}
    o_ref, lse_ref = attention_reference(q64, k64, v64, causal=causal, **seg)
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    o, lse = flash_attention(q, k, v, causal=causal, **seg)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    fin = torch.isfinite(lse_ref)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double()[fin], lse_ref[fin], rtol=1e-5, atol=1e-5)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(o_ref.shape, generator=g, dtype=torch.float64).to(device)
    wl = torch.randn(lse_ref.shape, generator=g, dtype=torch.float64).to(device)
    grads = torch.autograd.grad(_loss(o, lse, w, wl), (q, k, v))
    grads_ref = torch.autograd.grad(_loss(o_ref, lse_ref, w, wl), (q64, k64, v64))
    for a, b in zip(grads, grads_ref):
        assert torch.isfinite(a).all()
        _rel_close(a, b, 1e-4)
    blind = ~fin.any(1)  # (batch, seq_q): rows that see no key in any head
    assert torch.all(o[blind] == 0) and torch.all(grads[0][blind] == 0)
    return blind


@pytest.mark.parametrize("head_dim", [128])
def test_head_dim_128_and_custom_scale(head_dim, device):
    q64, k64, v64 = (t.requires_grad_() for t in _inputs(33, 33, 2, 1, head_dim, device, batch=1))
    o_ref, _ = attention_reference(q64, k64, v64, causal=True, softmax_scale=0.05)
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    o, _ = flash_attention(q, k, v, causal=True, softmax_scale=0.05)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    w = torch.randn_like(o_ref)
    for a, b in zip(torch.autograd.grad((o.double() * w).sum(), (q, k, v)),
                    torch.autograd.grad((o_ref * w).sum(), (q64, k64, v64))):
        _rel_close(a, b, 1e-4)


def test_float16_inputs(device):
    """float16 q/k/v: o and gradients come back in float16. Against float64 on the same
    (float16-rounded) inputs the error is set by casting p to float16 before the p·V product and by
    rounding the outputs, a few float16 ulps (2^-11 ~ 5e-4): we assert 4e-3 relative."""
    q16, k16, v16 = (t.half().requires_grad_() for t in _inputs(29, 29, 4, 2, 24, device, batch=1))
    o, lse = flash_attention(q16, k16, v16, causal=True)
    assert o.dtype == torch.float16 and lse.dtype == torch.float32
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q16, k16, v16))
    o_ref, lse_ref = attention_reference(q64, k64, v64, causal=True)
    _rel_close(o, o_ref, 4e-3)
    _rel_close(lse, lse_ref, 4e-3)
    w = torch.randn_like(o_ref)
    grads = torch.autograd.grad(o, (q16, k16, v16), w.half())
    for a, b in zip(grads, torch.autograd.grad((o_ref * w).sum(), (q64, k64, v64))):
        assert a.dtype == torch.float16
        _rel_close(a, b, 4e-3)


@pytest.mark.parametrize("causal", [True, False])
def test_merge_with_previous_block_equals_full(causal, device):
    """Ring step identity: attention over keys [0, 29) merged with keys [29, 61) == all keys.
    With a causal bottom-right mask the query block sits at the end of the key sequence, so the
    first key half is fully visible (non-causal) and the second half carries the causal mask."""
    q, k, v = (t.float() for t in _inputs(32, 61, 5, 5, 24, device))
    o_full, lse_full = attention_reference(q.double(), k.double(), v.double(), causal=causal)
    o1, lse1 = flash_attention_forward(q, k[:, :29], v[:, :29], causal=False)
    o2, lse2 = flash_attention_forward(q, k[:, 29:], v[:, 29:], causal=causal, o_prev=o1, lse_prev=lse1)
    assert o2.dtype == torch.float32
    torch.testing.assert_close(o2.double(), o_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse2.double(), lse_full, rtol=1e-5, atol=1e-5)


def test_merge_with_empty_previous_rows(device):
    """Rows whose previous lse is -inf (nothing seen yet) take the new block unchanged."""
    q, k, v = (t.float() for t in _inputs(20, 20, 5, 5, 24, device))
    o_prev = torch.zeros_like(q)
    lse_prev = torch.full((2, 5, 20), float("-inf"), device=device)
    o, lse = flash_attention_forward(q, k, v, causal=True, o_prev=o_prev, lse_prev=lse_prev)
    o_ref, lse_ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


def _inplace_merge_case(device):
    """A running result over keys [0, 29) stored in rows 3: of larger float32 buffers (rows 0..2
    hold other data), and the next key block [29, 61): the ring step's in-place merge."""
    q, k, v = (t.float() for t in _inputs(32, 61, 5, 5, 24, device))
    o1, lse1 = flash_attention_forward(q, k[:, :29], v[:, :29], causal=False)
    out = torch.randn(2, 35, 5, 24, device=device)
    lse = torch.randn(2, 5, 35, device=device)
    out[:, 3:], lse[:, :, 3:] = o1, lse1
    return q, k, v, out, lse


@pytest.mark.parametrize("causal", [True, False])
def test_inplace_merge_into_strided_views(causal, device):
    """inplace=True writes the merged result into o_prev / lse_prev themselves, here views of a
    row slice (non-contiguous lse), and leaves the rest of the buffers alone."""
    q, k, v, out, lse = _inplace_merge_case(device)
    keep_o, keep_l = out[:, :3].clone(), lse[:, :, :3].clone()
    o_full, lse_full = attention_reference(q.double(), k.double(), v.double(), causal=causal)
    o2, lse2 = flash_attention_forward(q, k[:, 29:], v[:, 29:], causal=causal,
                                       o_prev=out[:, 3:], lse_prev=lse[:, :, 3:], inplace=True)
    assert o2.data_ptr() == out[:, 3:].data_ptr() and lse2.data_ptr() == lse[:, :, 3:].data_ptr()
    torch.testing.assert_close(out[:, 3:].double(), o_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, :, 3:].double(), lse_full, rtol=1e-5, atol=1e-5)
    assert torch.equal(out[:, :3], keep_o) and torch.equal(lse[:, :, :3], keep_l)


def test_inplace_merge_survives_autotuning(real_autotune, device):
    """Triton's autotuner runs every config several times on the first call per shape: the
    in-place merge must be undone after each timed run (restore_value), or the block would be
    merged once per run. Through the real Autotuner, with the interpreter as the "GPU"."""
    q, k, v, out, lse = _inplace_merge_case(device)
    o_full, lse_full = attention_reference(q.double(), k.double(), v.double(), causal=True)
    flash_attention_forward(q, k[:, 29:], v[:, 29:], causal=True, o_prev=out[:, 3:],
                            lse_prev=lse[:, :, 3:], inplace=True)
    assert len(real_autotune) > 1  # several configs were timed
    torch.testing.assert_close(out[:, 3:].double(), o_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[:, :, 3:].double(), lse_full, rtol=1e-5, atol=1e-5)


def test_forward_and_backward_survive_autotuning(real_autotune, device):
    """flash_attention's forward and both backward kernels through the real Autotuner (several
    configs timed by repeated runs): the results equal the float64 reference."""
    q64, k64, v64 = (t.requires_grad_() for t in _inputs(45, 45, 6, 2, 40, device))
    o_ref, lse_ref = attention_reference(q64, k64, v64, causal=True)
    w = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad((o_ref * w).sum(), (q64, k64, v64))
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    o, lse = flash_attention(q, k, v, causal=True)
    grads = torch.autograd.grad((o.double() * w).sum(), (q, k, v))
    assert len(real_autotune) >= 3 * 2  # forward, dk/dv and dq each timed several configs
    _rel_close(o, o_ref, 1e-5)
    _rel_close(lse, lse_ref, 1e-5)
    for a, b in zip(grads, g_ref):
        _rel_close(a, b, 1e-4)


def _accumulate_case(device, causal):
    """Running gradient sums held in row slices of larger float32 buffers (a ring's dq and its
    dK/dV accumulator of shape (2, ...)), and the reference block gradients to add."""
    q64, k64, v64 = (t.requires_grad_() for t in _inputs(24, 50, 6, 2, 24, device))
    o_ref, lse_ref = attention_reference(q64, k64, v64, causal=causal)
    do = torch.randn_like(o_ref)
    ref = torch.autograd.grad((o_ref * do).sum(), (q64, k64, v64))
    q, k, v, do32 = (t.detach().float() for t in (q64, k64, v64, do))
    o, lse = o_ref.detach().float(), lse_ref.detach().float()
    dq_buf = torch.randn(2, 27, 6, 24, device=device)
    dkv_buf = torch.randn(2, 2, 53, 2, 24, device=device)
    views = (dq_buf[:, 3:], dkv_buf[0][:, 3:], dkv_buf[1][:, 3:])
    return (do32, q, k, v, o, lse), ref, dq_buf, dkv_buf, views


@pytest.mark.parametrize("which", ["all", "dq only", "dk/dv only"])
@pytest.mark.parametrize("causal", [True, False])
def test_backward_accumulates_into_strided_views(causal, which, device):
    """accumulate_into adds this block's gradients to the given buffers in place (row-slice
    views), returns fresh tensors for the None entries, and leaves the rest untouched."""
    args, ref, dq_buf, dkv_buf, views = _accumulate_case(device, causal)
    before = [t.clone() for t in views]
    keep = (dq_buf[:, :3].clone(), dkv_buf[:, :, :3].clone())
    pick = {"all": (0, 1, 2), "dq only": (0,), "dk/dv only": (1, 2)}[which]
    into = tuple(views[i] if i in pick else None for i in range(3))
    got = flash_attention_backward(*args, causal=causal, accumulate_into=into)
    for i, (g, r) in enumerate(zip(got, ref)):
        if i in pick:
            assert g.data_ptr() == views[i].data_ptr()
            _rel_close(views[i] - before[i], r, 1e-4)
        else:
            _rel_close(g, r, 1e-4)
            assert torch.equal(views[i], before[i])
    assert torch.equal(dq_buf[:, :3], keep[0]) and torch.equal(dkv_buf[:, :, :3], keep[1])


def test_backward_accumulation_survives_autotuning(real_autotune, device):
    """The accumulating backward through the real Autotuner (configs timed by repeated runs):
    without restore_value every timed run would add the gradients once more."""
    args, ref, _, _, views = _accumulate_case(device, True)
    before = [t.clone() for t in views]
    flash_attention_backward(*args, causal=True, accumulate_into=views)
    assert len(real_autotune) >= 2
    for view, b0, r in zip(views, before, ref):
        _rel_close(view - b0, r, 1e-4)


@pytest.mark.parametrize("causal", [True, False])
def test_global_lse_backward_sums_over_key_blocks(causal, device):
    """Backward with the GLOBAL (o, lse) of two key blocks: dq sums, dk/dv concatenate."""
    q64, k64, v64 = (t.requires_grad_() for t in _inputs(24, 50, 6, 2, 24, device))
    o_ref, lse_ref = attention_reference(q64, k64, v64, causal=causal)
    do = torch.randn_like(o_ref)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad((o_ref * do).sum(), (q64, k64, v64))
    q, k, v, do32 = (t.detach().float() for t in (q64, k64, v64, do))
    o, lse = o_ref.detach().float(), lse_ref.detach().float()
    a = flash_attention_backward(do32, q, k[:, :23], v[:, :23], o, lse, causal=False)
    b = flash_attention_backward(do32, q, k[:, 23:], v[:, 23:], o, lse, causal=causal)
    assert all(t.dtype == torch.float32 for t in a + b)
    _rel_close(a[0] + b[0], dq_ref, 1e-4)
    _rel_close(torch.cat([a[1], b[1]], 1), dk_ref, 1e-4)
    _rel_close(torch.cat([a[2], b[2]], 1), dv_ref, 1e-4)


def test_dispatcher_runs_triton(monkeypatch, device):
    from ctxscale.kernels.dispatch import chosen_paths

    monkeypatch.setenv("CTXSCALE_KERNELS_ATTENTION", "triton")
    q, k, v = (t.float() for t in _inputs(21, 21, 5, 5, 24, device, batch=1))
    o, lse = attention(q, k, v, causal=True, return_lse=True)
    assert chosen_paths()["attention"] == "triton"
    o_ref, lse_ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


def test_supports_and_errors(device):
    q, k, v = (t.float() for t in _inputs(8, 8, 4, 2, 24, device, batch=1))
    assert supports(q, k, v)
    assert not supports(q.double(), k.double(), v.double())  # float64: blockwise path instead
    if device.type == "cpu":  # the interpreter mis-computes bfloat16 dot products
        assert not supports(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert not supports(torch.zeros(1, 8, 4, 512, device=device), torch.zeros(1, 8, 2, 512, device=device),
                        torch.zeros(1, 8, 2, 512, device=device))
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        flash_attention(q, k[:, :, :1].expand(1, 8, 3, 24), v[:, :, :1].expand(1, 8, 3, 24))
    with pytest.raises(ValueError, match="both o_prev and lse_prev"):
        flash_attention_forward(q, k, v, o_prev=torch.zeros_like(q))
    lse_prev = torch.zeros(1, 4, 8, device=device)
    with pytest.raises(ValueError, match="inplace=True merges into o_prev"):
        flash_attention_forward(q, k, v, inplace=True)
    with pytest.raises(ValueError, match="dk and dv both given"):
        flash_attention_backward(q, q, k, v, q, lse_prev, accumulate_into=(None, torch.zeros_like(k), None))
    with pytest.raises(ValueError, match="accumulate_into dk must be shaped like k"):
        flash_attention_backward(q, q, k, v, q, lse_prev, accumulate_into=(None, q, q))
    with pytest.raises(ValueError, match="inplace=True needs float32"):
        flash_attention_forward(q.half(), k.half(), v.half(), o_prev=q.half(), lse_prev=lse_prev,
                                inplace=True)


# ------------------------------------------------------------------ document (segment) masking
def _doc_ids(rows, device, dtype=torch.int32):
    """(batch, seq) document ids from one [(length, id), ...] list per batch row."""
    return torch.stack([torch.cat([torch.full((n,), i, dtype=dtype) for n, i in row])
                        for row in rows]).to(device)


# seq 45 in 16-row tiles [0, 16), [16, 32), [32, 45). Row 0: documents of 7, 1, 20, 17 tokens,
# so boundaries fall inside tiles and off-diagonal tiles share no document (skipped); row 1:
# other lengths and ids out of order, one id used twice (attention only compares ids), where
# every tile's id range overlaps and nothing is skipped.
DOCS_45 = [[(7, 0), (1, 1), (20, 2), (17, 3)], [(17, 5), (1, 2), (20, 9), (7, 2)]]


@pytest.mark.parametrize("causal", [True, False])
def test_segments_match_reference(causal, device, tiles):
    """Packed documents of odd lengths, GQA (4 query heads on 2 key/value heads), head dim 24
    (padded to 32), square and unequal tiles."""
    q64, k64, v64 = (t.requires_grad_() for t in _inputs(45, 45, 4, 2, 24, device))
    ids = _doc_ids(DOCS_45, device, torch.int64 if causal else torch.int32)
    _check_against_reference(q64, k64, v64, causal, device, ids, ids)


@pytest.mark.parametrize("causal", [True, False])
def test_segments_head_dim_64(causal, device):
    q64, k64, v64 = (t.requires_grad_() for t in _inputs(45, 45, 4, 2, 64, device, seed=3))
    ids = _doc_ids(DOCS_45[::-1], device)
    _check_against_reference(q64, k64, v64, causal, device, ids, ids)


@pytest.mark.parametrize("sq, sk, causal", [(20, 33, True), (20, 33, False), (45, 20, True)])
def test_segments_ring_block(sq, sk, causal, device):
    """q rows of one ring block against the keys of another (seq_q != seq_k): a query whose
    document is absent from the key block sees nothing, here rows straddling a tile boundary
    (with seq_q > seq_k and causal, the first rows see nothing anyway)."""
    q64, k64, v64 = (t.requires_grad_() for t in _inputs(sq, sk, 4, 2, 24, device))
    q_docs = {20: [[(5, 4), (9, 5), (6, 6)], [(12, 1), (8, 7)]],
              45: [[(3, 0), (14, 1), (28, 2)], [(20, 3), (25, 4)]]}[sq]
    k_docs = {33: [[(10, 1), (15, 4), (8, 5)], [(33, 1)]],
              20: [[(6, 0), (14, 2)], [(11, 3), (9, 5)]]}[sk]
    blind = _check_against_reference(q64, k64, v64, causal, device, _doc_ids(q_docs, device),
                                     _doc_ids(k_docs, device))
    assert blind.any() and not blind.all()


def _segment_blocks(causal, device):
    """A ring step's query block (positions [20, 40) of 60 packed tokens) and the key blocks it
    meets: [0, 20) before it (no causal mask), [20, 40) on the diagonal, and [40, 60) after it
    (non-causal only). Documents start inside blocks, so some rows see nothing in one block."""
    q, k, v = _inputs(20, 60, 4, 2, 24, device)
    ids = _doc_ids([[(13, 0), (12, 1), (9, 2), (26, 3)], [(22, 4), (1, 5), (21, 6), (16, 7)]],
                   device)
    blocks = [(0, 20, False), (20, 40, causal)] + ([] if causal else [(40, 60, False)])
    keys = 40 if causal else 60
    return q, k[:, :keys], v[:, :keys], ids[:, 20:40], ids[:, :keys], blocks


@pytest.mark.parametrize("causal", [True, False])
def test_segments_merge_over_key_blocks(causal, device):
    """flash_attention_forward merged over the key blocks (each order: rows whose previous or
    current lse is -inf), the last step in place, equals the oracle over all keys."""
    q, k, v, q_ids, k_ids, blocks = _segment_blocks(causal, device)
    o_ref, lse_ref = attention_reference(q, k, v, causal=causal, q_segments=q_ids,
                                         k_segments=k_ids)
    q, k, v = q.float(), k.float(), v.float()
    for order in (blocks, blocks[::-1]):
        o = lse = None
        for n, (lo, hi, blk_causal) in enumerate(order):
            o, lse = flash_attention_forward(q, k[:, lo:hi], v[:, lo:hi], causal=blk_causal,
                                             o_prev=o, lse_prev=lse, inplace=n == len(order) - 1,
                                             q_segments=q_ids, k_segments=k_ids[:, lo:hi])
        torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_segments_global_lse_backward_over_key_blocks(causal, device):
    """Backward per key block with the GLOBAL (o, lse) and dlse, summed over the blocks, equals
    the oracle's gradients over all keys: the first block returns fresh gradients, the later
    ones add into them (dq) and into row slices of the dk/dv buffers (accumulate_into)."""
    q64, k64, v64, q_ids, k_ids, blocks = _segment_blocks(causal, device)
    q64, k64, v64 = (t.requires_grad_() for t in (q64, k64, v64))
    o_ref, lse_ref = attention_reference(q64, k64, v64, causal=causal, q_segments=q_ids,
                                         k_segments=k_ids)
    g = torch.Generator().manual_seed(2)
    do = torch.randn(o_ref.shape, generator=g, dtype=torch.float64).to(device)
    dlse = torch.randn(lse_ref.shape, generator=g, dtype=torch.float64).to(device)
    ref = torch.autograd.grad((o_ref * do).sum() + (lse_ref * dlse).sum(), (q64, k64, v64))
    q, k, v, do32, dlse32 = (t.detach().float() for t in (q64, k64, v64, do, dlse))
    o, lse = o_ref.detach().float(), lse_ref.detach().float()
    (lo, hi, c), later = blocks[0], blocks[1:]
    dq, dk0, dv0 = flash_attention_backward(do32, q, k[:, lo:hi], v[:, lo:hi], o, lse, causal=c,
                                            dlse=dlse32, q_segments=q_ids,
                                            k_segments=k_ids[:, lo:hi])
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    dk[:, lo:hi], dv[:, lo:hi] = dk0, dv0
    for lo, hi, c in later:
        flash_attention_backward(do32, q, k[:, lo:hi], v[:, lo:hi], o, lse, causal=c,
                                 dlse=dlse32, q_segments=q_ids, k_segments=k_ids[:, lo:hi],
                                 accumulate_into=(dq, dk[:, lo:hi], dv[:, lo:hi]))
    for a, b in zip((dq, dk, dv), ref):
        _rel_close(a, b, 1e-4)


def test_segments_one_document_is_plain_attention_and_errors(device):
    q, k, v = (t.float() for t in _inputs(21, 21, 4, 2, 24, device, batch=1))
    one = torch.zeros(1, 21, dtype=torch.int32, device=device)
    assert supports(q, k, v, q_segments=one, k_segments=one)
    o, lse = flash_attention(q, k, v, q_segments=one, k_segments=one)
    o_ref, lse_ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="q_segments was given without k_segments"):
        flash_attention(q, k, v, q_segments=one)
    with pytest.raises(ValueError, match="k_segments was given without q_segments"):
        flash_attention_forward(q, k, v, k_segments=one)
    with pytest.raises(ValueError, match=r"k_segments must be .* shape \(1, 21\)"):
        flash_attention(q, k, v, q_segments=one, k_segments=one[:, :20])
    with pytest.raises(ValueError, match=r"q_segments must be an int32 or int64 .*float32"):
        flash_attention_backward(q, q, k, v, q, lse, q_segments=one.float(), k_segments=one)
    with pytest.raises(ValueError, match="q_segments is on meta"):
        flash_attention(q, k, v, q_segments=one.to("meta"), k_segments=one)


@pytest.mark.parametrize("causal", [True, False])
def test_segments_skip_tiles_of_other_documents(causal, device):
    """Tiles that share no document are skipped, not merely masked: keys [0, 128) belong to a
    document no query is in and hold NaN (a masked tile would still form 0 · NaN in p · v and
    ds · q), yet o, lse, dq and the other keys' dk, dv are exact, and the NaN keys get dk = dv
    = 0 (no query tile ever met them). 128 keeps the NaN keys in tiles of their own for every
    tile size up to 128, the GPU configs' included."""
    q64, k64, v64 = _inputs(16, 250, 2, 1, 24, device, batch=1)
    k64[:, :128], v64[:, :128] = float("nan"), float("nan")
    q_ids = torch.full((1, 16), 5, dtype=torch.int32, device=device)
    k_ids = _doc_ids([[(128, 1), (122, 5)]], device)
    q64, k_own, v_own = (t.requires_grad_() for t in (q64, k64[:, 128:].clone(), v64[:, 128:].clone()))
    o_ref, lse_ref = attention_reference(q64, k_own, v_own, causal=causal)
    do = torch.randn_like(o_ref)
    ref = torch.autograd.grad((o_ref * do).sum(), (q64, k_own, v_own))
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    o, lse = flash_attention(q, k, v, causal=causal, q_segments=q_ids, k_segments=k_ids)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do.float())
    _rel_close(o, o_ref, 1e-5)
    _rel_close(lse, lse_ref, 1e-5)
    for a, b in zip((dq, dk[:, 128:], dv[:, 128:]), ref):
        _rel_close(a, b, 1e-4)
    assert torch.all(dk[:, :128] == 0) and torch.all(dv[:, :128] == 0)
