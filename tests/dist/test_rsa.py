"""Ring Self-Attention (dist/rsa.py) against the float64 single-process oracle, and its byte
counters in closed form. Tolerances are derived in tests/dist/test_ring.py: float32 exact
attention vs float64 agrees to ~1e-6 normwise; we assert the 1e-5 contract. RSA's softmax is
the plain full-row softmax, so its error is that of the reference algorithm in float32.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist.test_ring import (
    F32_TOL,
    HEAD_DIM,
    LAYOUTS,
    _counted,
    assert_oracle_and_growth,
    bf16_check,
    sweep_max_errors,
)
from tests.harness import run_distributed


def test_rsa_oracle_p2_p4_and_error_does_not_grow():
    assert_oracle_and_growth("rsa")


def test_rsa_oracle_p8():
    cases = [dict(layout=layout, causal=True, heads=6, kv_heads=2, seq_len=112)
             for layout in LAYOUTS]
    for case, e in zip(cases, sweep_max_errors("rsa", 8, cases)):
        assert max(e.values()) < F32_TOL, (case, e)


def test_rsa_bfloat16():
    bf16_check("rsa")


@pytest.mark.parametrize("world,dtype_name", [(2, "float32"), (4, "bfloat16")])
def test_rsa_bytes_closed_form(world, dtype_name):
    b, seq_len, heads, kv_heads, d = 2, 56, 6, 2, HEAD_DIM
    n = seq_len // world
    elem = torch.tensor([], dtype=getattr(torch, dtype_name)).element_size()
    kv_elems = b * n * kv_heads * d
    stats = run_distributed(_counted, world, args=("rsa", "stripe", True, heads, kv_heads,
                                                    seq_len, dtype_name))
    for fwd, bwd in stats:
        # forward: a K ring then a V ring, P-1 synchronous hops each
        assert fwd["p2p"]["bytes_sent"] == 2 * (world - 1) * kv_elems * elem
        assert fwd["p2p"]["bytes_received"] == 2 * (world - 1) * kv_elems * elem
        assert fwd["p2p"]["calls"] == 2 * (world - 1)
        # backward: V ring + float32 dV accumulator ring, then K ring + dK accumulator ring
        expected = 2 * (world - 1) * kv_elems * elem + 2 * (world - 1) * kv_elems * 4
        assert bwd["p2p"]["bytes_sent"] == expected
        assert bwd["p2p"]["bytes_received"] == expected
        assert bwd["p2p"]["calls"] == 4 * (world - 1)
        # RSA computes every block, masked or not: P blocks of 4·b·h·n·n·d FLOPs per rank
        assert fwd["attention"]["blocks"] == world
        assert fwd["attention"]["flops"] == 4.0 * b * heads * n * n * d * world
