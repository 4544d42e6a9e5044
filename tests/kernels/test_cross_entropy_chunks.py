"""Chunked linear cross-entropy (`kernels/cross_entropy.py`): the in-place chunk update and the
automatic chunk size, against the full-logits float64 reference.

The chunk loop works in place on one float32 logits buffer (exp(logits − max), rows scaled by
valid/sum, minus the one-hot): a chunk whose labels are all ignored, a partial last chunk and a
bias must all give the reference loss and gradients. float32 logits against a float64 reference:
~1e-6 relative per logit, summed over ≤ 100 terms, so 1e-5 is the stated tolerance.
"""

from __future__ import annotations

import pytest
import torch

from ctxscale.kernels.cross_entropy import (
    DEFAULT_CHUNK,
    auto_chunk_size,
    chunked_cross_entropy,
)


def _reference64(h, w, y, bias=None):
    """Mean cross-entropy over labelled tokens from full float64 logits."""
    logits = h.double() @ w.double().t() + (0 if bias is None else bias.double())
    return torch.nn.functional.cross_entropy(logits, y, ignore_index=-100)


@pytest.mark.parametrize("with_bias", [False, True])
def test_ignored_chunk_partial_chunk_float32(with_bias):
    g = torch.Generator().manual_seed(3)
    tokens, dim, vocab = 61, 20, 97
    h64 = torch.randn(tokens, dim, generator=g, dtype=torch.float64)
    w64 = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
    b64 = torch.randn(vocab, generator=g, dtype=torch.float64) if with_bias else None
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[8:16] = -100  # the whole second chunk (chunk_size 8) is unlabelled
    y[-1] = -100
    leaves64 = [t.requires_grad_() for t in (h64, w64, b64) if t is not None]
    leaves32 = [t.detach().float().requires_grad_() for t in leaves64]
    h, w = leaves32[:2]
    b = leaves32[2] if with_bias else None
    out = chunked_cross_entropy(h, w, y, bias=b, reduction="mean", chunk_size=8)
    ref = _reference64(h64, w64, y, b64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for a, r in zip(torch.autograd.grad(out, leaves32), torch.autograd.grad(ref, leaves64)):
        torch.testing.assert_close(a.double(), r, rtol=1e-5, atol=1e-5)


def test_auto_chunk_size_and_default_path():
    assert auto_chunk_size(32000) == 1048  # 2**25 logits per chunk
    assert auto_chunk_size(128256) == 261
    assert auto_chunk_size(1_000_000) == 256  # lower clamp keeps matmuls efficient
    assert auto_chunk_size(211) == DEFAULT_CHUNK
    g = torch.Generator().manual_seed(4)
    h = torch.randn(45, 12, generator=g, dtype=torch.float64)
    w = torch.randn(33, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 33, (45,), generator=g)
    torch.testing.assert_close(chunked_cross_entropy(h, w, y, reduction="mean").double(),
                               _reference64(h, w, y), rtol=1e-5, atol=1e-5)
