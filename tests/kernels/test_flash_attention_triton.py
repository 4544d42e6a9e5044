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
    o_ref, lse_ref = attention_reference(q64, k64, v64, causal=causal)
    q, k, v = (t.detach().float().requires_grad_() for t in (q64, k64, v64))
    o, lse = flash_attention(q, k, v, causal=causal)
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
        _rel_close(a, b, 1e-4)


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
