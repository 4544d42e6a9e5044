"""kernels.attention: every PyTorch path against the float64 full-score reference.

Tolerances: the blockwise path is the same exact algorithm with a different summation order, so
in float64 it agrees to ~1e-12; in float32 the online-softmax rescaling adds O(eps·log(blocks))
relative error, well inside 1e-5.
"""

import pytest
import torch

from ctxscale.kernels import attention, attention_backward, attention_forward, attention_reference
from ctxscale.kernels.attention import attention_blockwise

SHAPES = [  # (seq_q, seq_k, heads, kv_heads, head_dim)
    (37, 37, 5, 5, 24),
    (37, 37, 6, 2, 24),
    (20, 45, 6, 3, 16),
    (45, 20, 5, 1, 24),
]


def _inputs(sq, sk, h, hk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, sq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(2, sk, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(2, sk, hk, d, generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v)]


def _grads(o, lse, inputs, w, wl):
    fin = torch.isfinite(lse)
    loss = (o.double() * w).sum() + (torch.where(fin, lse.double(), 0) * wl).sum()
    return torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_blockwise_matches_reference_float64(shape, causal):
    q, k, v = _inputs(*shape, torch.float64)
    o_ref, lse_ref = attention_reference(q, k, v, causal=causal)
    o, lse = attention_blockwise(q, k, v, causal=causal, block_size=8)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref))
    fin = torch.isfinite(lse_ref)
    torch.testing.assert_close(o, o_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse[fin], lse_ref[fin], rtol=1e-12, atol=1e-12)
    w = torch.randn_like(o_ref)
    wl = torch.randn_like(lse_ref)
    for a, b in zip(_grads(o, lse, (q, k, v), w, wl), _grads(o_ref, lse_ref, (q, k, v), w, wl)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("causal", [True, False])
def test_float32_paths_match_float64_reference(causal, monkeypatch):
    shape = (37, 37, 6, 2, 24)
    q64, k64, v64 = _inputs(*shape, torch.float64)
    o_ref, lse_ref = attention_reference(q64, k64, v64, causal=causal)
    w = torch.randn_like(o_ref)
    g_ref = torch.autograd.grad((o_ref * w).sum(), (q64, k64, v64))
    for path in ["blockwise", "sdpa", "reference"]:
        monkeypatch.setenv("CTXSCALE_KERNELS_ATTENTION", path)
        q, k, v = _inputs(*shape, torch.float32)
        o = attention(q, k, v, causal=causal)
        torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad((o.double() * w).sum(), (q, k, v))
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("used", ["o", "lse"])
def test_blockwise_backward_when_only_one_output_is_used(used):
    """A loss on o alone (dlse None: the fused CPU kernel's backward) or on lse alone (do None)
    gives the reference gradients."""
    for dtype, tol in ((torch.float64, 1e-11), (torch.float32, 1e-5)):
        q, k, v = _inputs(37, 37, 6, 2, 24, dtype)
        o, lse = attention_blockwise(q, k, v, causal=True)
        o_ref, lse_ref = attention_reference(*(t.double() for t in (q, k, v)), causal=True)
        w = torch.randn(o_ref.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        wl = torch.randn(lse_ref.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
        got = torch.autograd.grad((o.double() * w).sum() if used == "o" else (lse.double() * wl).sum(),
                                  (q, k, v))
        qr, kr, vr = (t.detach().double().requires_grad_() for t in (q, k, v))
        o_ref, lse_ref = attention_reference(qr, kr, vr, causal=True)
        ref = torch.autograd.grad((o_ref * w).sum() if used == "o" else (lse_ref * wl).sum(),
                                  (qr, kr, vr), allow_unused=True)  # lse does not depend on v
        for a, b, x in zip(got, ref, (qr, kr, vr)):
            b = torch.zeros_like(x) if b is None else b
            torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


def test_global_lse_backward_splits_over_key_blocks():
    """Backward with the *global* (o, lse) summed over two key blocks equals the full backward:
    the identity ring attention relies on."""
    q, k, v = _inputs(33, 33, 5, 5, 24, torch.float64)
    o, lse = attention_forward(q, k, v, causal=False)
    do = torch.randn_like(o)
    full = attention_backward(do, q, k, v, o, lse, causal=False)
    a = attention_backward(do, q, k[:, :20], v[:, :20], o, lse, causal=False)
    b = attention_backward(do, q, k[:, 20:], v[:, 20:], o, lse, causal=False)
    torch.testing.assert_close(a[0] + b[0], full[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([a[1], b[1]], 1), full[1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.cat([a[2], b[2]], 1), full[2], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False])
def test_block_entry_points_run_triton_where_attention_does(causal, monkeypatch, device):
    """attention_forward / attention_backward (the ring and LightSeq block steps) take the Triton
    kernel wherever attention() would (CUDA by default; forced here so the interpreter runs it on
    CPU), with the same contract: float32 (o, lse), and a backward from a global (o, lse) and a
    dlse split over two key blocks. Against the float64 blockwise path: the kernel's float32
    tolerances (1e-5 forward, 1e-4 gradients relative to the largest entry)."""
    from ctxscale.kernels import chosen_paths

    q64, k64, v64 = (t.to(device) for t in _inputs(29, 45, 6, 2, 40, torch.float64))
    do64 = torch.randn(q64.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    dlse64 = torch.randn(q64.shape[0], q64.shape[2], q64.shape[1],
                         generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    do64, dlse64 = do64.to(device), dlse64.to(device)
    o_ref, lse_ref = attention_forward(q64, k64, v64, causal=causal)
    ref = attention_backward(do64, q64, k64, v64, o_ref, lse_ref, causal=causal, dlse=dlse64)
    monkeypatch.setenv("CTXSCALE_KERNELS_ATTENTION", "triton")
    q, k, v, do, dlse = (t.float() for t in (q64, k64, v64, do64, dlse64))
    o, lse = attention_forward(q, k, v, causal=causal)
    assert chosen_paths()["attention_block"] == "triton"
    assert o.dtype == lse.dtype == torch.float32
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse))
    torch.testing.assert_close(o.double(), o_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse.double()[fin], lse_ref[fin], rtol=1e-5, atol=1e-5)
    got = attention_backward(do, q, k, v, o, lse, causal=causal, dlse=dlse)
    assert chosen_paths()["attention_block"] == "triton"
    for name, a, r in zip(("dq", "dk", "dv"), got, ref):
        assert a.dtype == torch.float32, name
        err = (a.double() - r).abs().max().item()
        assert err <= 1e-4 * r.abs().max().item(), (name, err)
    if not causal:  # two key blocks' backwards from the global (o, lse) add up to the whole
        a, b = (attention_backward(do, q, k[:, sl], v[:, sl], o, lse, causal=False, dlse=dlse)
                for sl in (slice(0, 20), slice(20, None)))
        torch.testing.assert_close(a[0] + b[0], got[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([a[1], b[1]], 1), got[1], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.cat([a[2], b[2]], 1), got[2], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path,dtype,merge", [
    (None, torch.float32, "pytorch"),  # CPU: the fused CPU kernel, then merge_attention
    ("blockwise", torch.float64, "pytorch"),
    ("triton", torch.float32, "in_kernel"),  # the kernel merges in place (interpreter on CPU)
])
def test_forward_merge_into_row_slices(path, dtype, merge, monkeypatch, device):
    """attention_forward_merge (the ring / LightSeq step) merges a key block into the running
    (out, lse) rows it is given, in place, on every path: the result is attention over both key
    blocks; the rows outside the slice are untouched."""
    from ctxscale.kernels import attention_forward_merge, chosen_paths

    if path is not None:
        monkeypatch.setenv("CTXSCALE_KERNELS_ATTENTION", path)
    q, k, v = (t.detach().to(device) for t in _inputs(24, 50, 6, 2, 24, dtype))
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.randn(2, 30, 6, 24, dtype=cdt, device=device)
    lse = torch.randn(2, 6, 30, dtype=cdt, device=device)
    o1, l1 = attention_forward(q, k[:, :26], v[:, :26], causal=False)
    out[:, 6:], lse[:, :, 6:] = o1, l1
    keep_o, keep_l = out[:, :6].clone(), lse[:, :, :6].clone()
    attention_forward_merge(q, k[:, 26:], v[:, 26:], out[:, 6:], lse[:, :, 6:], causal=True)
    if path is None and device.type == "cuda":
        merge = "in_kernel"  # the default on CUDA is the Triton kernel
    assert chosen_paths()["attention_merge"] == merge
    o_ref, lse_ref = attention_reference(q.double(), k.double(), v.double(), causal=True)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out[:, 6:].double(), o_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse[:, :, 6:].double(), lse_ref, rtol=tol, atol=tol)
    assert torch.equal(out[:, :6], keep_o) and torch.equal(lse[:, :, :6], keep_l)


@pytest.mark.parametrize("path,dtype,summed", [
    (None, torch.float32, "pytorch"),  # CPU: the fused CPU kernel's backward, then add_
    ("blockwise", torch.float64, "pytorch"),
    ("triton", torch.float32, "in_kernel"),  # the kernels add in place (interpreter on CPU)
])
def test_backward_into_running_sums(path, dtype, summed, monkeypatch, device):
    """attention_backward_into (the ring / LightSeq backward step) adds dq and dk/dv into the
    given buffers (views) and returns a fresh gradient where it is given None, on every path."""
    from ctxscale.kernels import attention_backward_into, chosen_paths

    if path is not None:
        monkeypatch.setenv("CTXSCALE_KERNELS_ATTENTION", path)
    q, k, v = (t.detach().to(device) for t in _inputs(24, 40, 6, 2, 24, dtype))
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    o, lse = attention_forward(q, k, v, causal=True)
    do = torch.randn(q.shape, generator=torch.Generator().manual_seed(2), dtype=dtype).to(device)
    ref = attention_backward(do, q, k, v, o, lse, causal=True)
    dq = torch.randn(2, 30, 6, 24, dtype=cdt, device=device)[:, 6:]
    dkv = torch.randn(2, 2, 40, 2, 24, dtype=cdt, device=device)
    dq0, dk0 = dq.clone(), dkv[0].clone()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    got = attention_backward_into(do, q, k, v, o, lse, (dq, dkv[0], dkv[1]), causal=True)
    if path is None and device.type == "cuda":
        summed = "in_kernel"  # the default on CUDA is the Triton kernel
    assert chosen_paths()["attention_grad_sum"] == summed
    assert got[0].data_ptr() == dq.data_ptr()
    torch.testing.assert_close(dq - dq0, ref[0], rtol=tol, atol=tol)
    torch.testing.assert_close(dkv[0] - dk0, ref[1], rtol=tol, atol=tol)
    fresh = attention_backward_into(do, q, k, v, o, lse, (None, dkv[0], dkv[1]), causal=True)
    torch.testing.assert_close(fresh[0], ref[0], rtol=tol, atol=tol)


def test_block_entry_points_build_no_autograd_graph():
    """attention_forward / attention_backward are the inside of autograd Functions (ring,
    LightSeq): on inputs that require grad they must not record a graph (memory per ring step)."""
    q, k, v = (t.requires_grad_() for t in _inputs(21, 21, 2, 2, 8, torch.float64))
    o, lse = attention_forward(q, k, v)
    grads = attention_backward(torch.ones_like(o), q, k, v, o, lse)
    assert not any(t.requires_grad for t in (o, lse, *grads))


def test_default_path_on_cpu_is_sdpa_without_lse_and_blockwise_with_lse():
    from ctxscale.kernels import chosen_paths

    q, k, v = _inputs(17, 17, 2, 2, 8, torch.float32)
    attention(q, k, v)
    assert chosen_paths()["attention"] == "sdpa"
    attention(q, k, v, return_lse=True)
    assert chosen_paths()["attention"] == "blockwise"


def test_bad_shapes_are_rejected():
    q = torch.randn(1, 8, 5, 16)
    k = torch.randn(1, 8, 2, 16)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        attention(q, k, k)
    with pytest.raises(ValueError, match=r"\(batch, seq, heads, head_dim\)"):
        attention(q[0], k[0], k[0])


def test_bfloat16_close_to_float64():
    q, k, v = _inputs(37, 37, 6, 2, 24, torch.float64)
    o_ref, _ = attention_reference(q, k, v)
    o = attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), return_lse=True)[0]
    # bf16 inputs carry 2^-8 relative rounding; outputs are convex combinations of v (|v|~1).
    torch.testing.assert_close(o.double(), o_ref, rtol=0, atol=3e-2)
