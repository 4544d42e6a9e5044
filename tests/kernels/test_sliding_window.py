"""Blockwise sliding-window attention against the full-mask reference (forward and backward).

Tolerances: float64, same math in another summation order: <= 1e-10 relative to each tensor's
largest entry. float32 blockwise against the float64 reference: softmax over <= window + prefix
terms of size O(1), a few ulps each: <= 1e-5 relative.
"""

import pytest
import torch

from ctxscale.kernels.sliding_window import (
    sliding_window_attention,
    sliding_window_attention_reference,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny shapes: intra-op threads only add synchronization cost (and contend on shared CI)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _inputs(*, b=2, sq=37, sk=37, h=5, hk=5, d=24, n_prefix=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, sk, hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, sk, hk, d, generator=g, dtype=torch.float64)
    pk = torch.randn(1, n_prefix, hk, d, generator=g, dtype=torch.float64) if n_prefix else None
    pv = torch.randn(1, n_prefix, hk, d, generator=g, dtype=torch.float64) if n_prefix else None
    return q, k, v, pk, pv


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "window,sq,sk,h,hk,n_prefix,block",
    [
        (1, 37, 37, 5, 5, 0, 8),      # only itself
        (7, 37, 37, 5, 5, 0, 8),      # window shorter than a block
        (13, 37, 37, 6, 2, 3, 5),     # GQA, persistent prefix, window longer than a block
        (50, 37, 37, 5, 5, 2, 16),    # window longer than the sequence: causal attention
        (9, 23, 31, 5, 5, 0, 6),      # 8 earlier keys (KV cache / halo), bottom-right aligned
    ],
)
def test_blockwise_matches_full_mask_reference(dtype, window, sq, sk, h, hk, n_prefix, block):
    q, k, v, pk, pv = _inputs(sq=sq, sk=sk, h=h, hk=hk, n_prefix=n_prefix)
    ref_in = [t.clone().requires_grad_() if t is not None else None for t in (q, k, v, pk, pv)]
    ref = sliding_window_attention_reference(*ref_in[:3], window=window, prefix_k=ref_in[3],
                                             prefix_v=ref_in[4])
    w = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (ref * w).sum().backward()
    ins = [t.to(dtype).requires_grad_() if t is not None else None for t in (q, k, v, pk, pv)]
    out = sliding_window_attention(*ins[:3], window=window, prefix_k=ins[3], prefix_v=ins[4],
                                   block_size=block)
    assert out.dtype == dtype
    (out * w.to(dtype)).sum().backward()
    assert _rel(out, ref) <= TOL[dtype]
    for a, r in zip(ins, ref_in):
        if a is not None:
            assert _rel(a.grad, r.grad) <= TOL[dtype]


def test_reference_is_causal_window_attention():
    """The reference itself against explicit per-query softmax over the keys i-window < j <= i."""
    q, k, v, _, _ = _inputs(b=1, sq=11, sk=11, h=1, hk=1, d=4)
    window = 4
    out = sliding_window_attention_reference(q, k, v, window=window)
    for i in range(11):
        keys = slice(max(0, i - window + 1), i + 1)
        p = torch.softmax(q[0, i, 0] @ k[0, keys, 0].T / 2.0, -1)
        torch.testing.assert_close(out[0, i, 0], p @ v[0, keys, 0], rtol=1e-12, atol=1e-12)


def test_split_with_cache_equals_one_pass():
    """Queries in two pieces, the second with the last window-1 keys prepended, = one pass."""
    q, k, v, pk, pv = _inputs(sq=29, sk=29, n_prefix=2)
    window = 6
    full = sliding_window_attention(q, k, v, window=window, prefix_k=pk, prefix_v=pv)
    first = sliding_window_attention(q[:, :13], k[:, :13], v[:, :13], window=window,
                                     prefix_k=pk, prefix_v=pv)
    lo = 13 - (window - 1)
    second = sliding_window_attention(q[:, 13:], k[:, lo:], v[:, lo:], window=window,
                                      prefix_k=pk, prefix_v=pv)
    assert _rel(torch.cat([first, second], 1), full) <= 1e-12


def test_bad_arguments():
    q, k, v, _, _ = _inputs(sq=5, sk=5)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="seq_k"):
        sliding_window_attention(q, k[:, :3], v[:, :3], window=2)
