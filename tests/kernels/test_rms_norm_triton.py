"""kernels/rms_norm_triton.py against `kernels.norm.rms_norm_reference` (HF Llama numerics).

float32: the kernel and a float64 evaluation of the same formula differ by float32 rounding of
a dim-long reduction, ~1e-6 relative; we assert 1e-5 (outputs) and 1e-4 relative to the largest
entry for gradients (dweight sums over all rows). float16 input with a float32 weight: both paths
round the normalized x to float16 at the same point, so they agree to one float16 ulp (~1e-3).
"""

import pytest
import torch

from ctxscale.kernels.norm import rms_norm, rms_norm_reference
from ctxscale.kernels.rms_norm_triton import rms_norm as rms_norm_triton


def _rel_close(a, b, tol):
    err = (a.double() - b.double()).abs().max().item()
    assert err <= tol * b.double().abs().max().item(), f"max error {err:.3e}"


@pytest.mark.parametrize("shape", [(3, 7, 40), (5, 129)])
def test_rms_norm_float32_matches_float64_reference(shape, device):
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64).to(device).requires_grad_()
    w64 = torch.randn(shape[-1], generator=g, dtype=torch.float64).to(device).requires_grad_()
    y_ref = rms_norm_reference(x64, w64, 1e-5)
    x, w = (t.detach().float().requires_grad_() for t in (x64, w64))
    y = rms_norm_triton(x, w, 1e-5)
    assert y.dtype == torch.float32 and y.shape == x.shape
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    dy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64).to(device)
    gx, gw = torch.autograd.grad(y, (x, w), dy.float())
    gx_ref, gw_ref = torch.autograd.grad(y_ref, (x64, w64), dy)
    _rel_close(gx, gx_ref, 1e-4)
    _rel_close(gw, gw_ref, 1e-4)


def test_rms_norm_half_input_matches_hf_numerics(device):
    g = torch.Generator().manual_seed(1)
    x = (3 * torch.randn(4, 9, 24, generator=g)).half().to(device)
    w = torch.randn(24, generator=g).to(device)
    y = rms_norm_triton(x, w, 1e-6)
    y_ref = rms_norm_reference(x, w, 1e-6)
    assert y.dtype == y_ref.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-3, atol=1e-3)


def test_dispatcher_runs_triton(monkeypatch, device):
    from ctxscale.kernels.dispatch import chosen_paths

    monkeypatch.setenv("CTXSCALE_KERNELS_RMS_NORM", "triton")
    x = torch.randn(6, 40, device=device)
    w = torch.randn(40, device=device)
    y = rms_norm(x, w, 1e-6)
    assert chosen_paths()["rms_norm"] == "triton"
    torch.testing.assert_close(y, rms_norm_reference(x, w, 1e-6), rtol=1e-5, atol=1e-5)


def test_rms_norm_rejects_wrong_weight(device):
    with pytest.raises(ValueError, match="weight of shape"):
        rms_norm_triton(torch.randn(3, 8, device=device), torch.randn(7, device=device))
