import math

import pytest
import torch

from ctxscale.kernels.cross_entropy import chunked_cross_entropy, cross_entropy_reference
from ctxscale.kernels.norm import RMSNorm, rms_norm_reference
from ctxscale.kernels.rotary import RopeScaling, apply_rotary, rope_cos_sin, rope_inv_freq


def test_rms_norm_module_matches_reference():
    x = torch.randn(3, 7, 24)
    m = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        m.weight.copy_(torch.randn(24))
    manual = x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * m.weight
    torch.testing.assert_close(m(x), manual, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rms_norm_reference(x, m.weight, 1e-5), manual, rtol=1e-6, atol=1e-6)


def test_rope_is_a_rotation_and_relative():
    d = 24
    inv, scale = rope_inv_freq(d, 10000.0)
    assert scale == 1.0
    q = torch.randn(1, 1, 1, d, dtype=torch.float64)
    k = torch.randn(1, 1, 1, d, dtype=torch.float64)

    def rot(x, p):
        cos, sin = rope_cos_sin(torch.tensor([[p]]), inv)
        return apply_rotary(x, cos.double(), sin.double())

    # norm preserved, and <rope(q, m), rope(k, n)> depends on m - n only
    assert torch.allclose(rot(q, 5).norm(), q.norm())
    a = (rot(q, 9) * rot(k, 4)).sum()
    b = (rot(q, 105) * rot(k, 100)).sum()
    assert torch.allclose(a, b, atol=1e-4)  # cos/sin are float32: ~1e-6 * |position| error


def test_rope_scalings():
    base = rope_inv_freq(32, 10000.0)[0]
    lin = rope_inv_freq(32, 10000.0, RopeScaling(type="linear", factor=4.0))[0]
    torch.testing.assert_close(lin, base / 4)
    ntk = rope_inv_freq(32, 10000.0, RopeScaling(type="ntk", factor=4.0))[0]
    assert ntk[0] == base[0] and ntk[-1] < base[-1]
    l3 = rope_inv_freq(32, 500000.0, RopeScaling(type="llama3", factor=8.0,
                                                  original_max_position_embeddings=64))[0]
    assert l3[0] == rope_inv_freq(32, 500000.0)[0][0]  # highest frequency untouched
    yarn_freq, yarn_scale = rope_inv_freq(32, 10000.0, RopeScaling(type="yarn", factor=4.0,
                                                                   original_max_position_embeddings=128))
    assert yarn_scale == pytest.approx(0.1 * math.log(4.0) + 1.0)
    with pytest.raises(ValueError, match="not one of"):
        rope_inv_freq(32, 10000.0, RopeScaling(type="magic"))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_cross_entropy_matches_full_logits(reduction, with_bias):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(53, 24, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(101, 24, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(101, generator=g, dtype=torch.float64, requires_grad=True) if with_bias else None
    y = torch.randint(0, 101, (53,), generator=g)
    y[::7] = -100
    ref = cross_entropy_reference(h, w, y, bias=b, reduction=reduction)
    out = chunked_cross_entropy(h, w, y, bias=b, reduction=reduction, chunk_size=10)
    torch.testing.assert_close(out.double(), ref.double(), rtol=1e-6, atol=1e-6)
    inputs = [t for t in (h, w, b) if t is not None]
    g_ref = torch.autograd.grad(ref * 1.7, inputs)
    g_out = torch.autograd.grad(out * 1.7, inputs)
    for a, r in zip(g_out, g_ref):
        # chunk logits are float32, so agreement is float32-level
        torch.testing.assert_close(a.double(), r.double(), rtol=1e-5, atol=1e-5)


def test_chunked_cross_entropy_without_grad_and_errors():
    h = torch.randn(10, 8)
    w = torch.randn(5, 8)
    y = torch.randint(0, 5, (10,))
    with torch.no_grad():
        out = chunked_cross_entropy(h, w, y, chunk_size=3)
    torch.testing.assert_close(out, cross_entropy_reference(h, w, y), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        chunked_cross_entropy(h, w, y, reduction="max")
