"""`context_parallel_attention` (dist/context_parallel.py): validation errors, the size-1 path,
dispatch to ring / rsa (oracle, tolerance derived in tests/dist/test_ring.py), the call contract
of the lazily imported lightseq / ulysses / usp modules, and context-parallel subgroups."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.distributed as dist
from ctxscale.dist import context_parallel_attention
from ctxscale.kernels import attention

from tests.dist.test_ring import F32_TOL, oracle_case, sweep_max_errors
from tests.harness import run_distributed


def _qkv(seq=6, heads=5, kv_heads=5, d=24, batch=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, seq, heads, d, generator=g),
            torch.randn(batch, seq, kv_heads, d, generator=g),
            torch.randn(batch, seq, kv_heads, d, generator=g))


def test_validation_errors_single_process():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"unknown context-parallel method 'flash'.*'ring'"):
        context_parallel_attention(q, k, v, method="flash")
    with pytest.raises(ValueError, match=r"unknown sequence layout 'diagonal'.*'zigzag'"):
        context_parallel_attention(q, k, v, layout="diagonal")
    with pytest.raises(ValueError, match=r"'lightseq' does not support layout 'zigzag'"):
        context_parallel_attention(q, k, v, method="lightseq", layout="zigzag")
    with pytest.raises(ValueError, match=r"expects \(batch, seq_local, heads, head_dim\)"):
        context_parallel_attention(q[0], k, v)
    with pytest.raises(ValueError, match="same sequence; got local lengths 6, 5, 5"):
        context_parallel_attention(q, k[:, :5], v[:, :5])
    q6, k4, v4 = _qkv(heads=6, kv_heads=4)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        context_parallel_attention(q6, k4, v4)
    with pytest.raises(ValueError, match="ulysses_degree=2 is only used by method='usp'"):
        context_parallel_attention(q, k, v, method="ring", ulysses_degree=2)


def test_single_process_is_plain_attention():
    q, k, v = _qkv(seq=7, heads=6, kv_heads=2)
    for causal in (True, False):
        for method in ("ring", "rsa", "ulysses"):
            out = context_parallel_attention(q, k, v, method=method, causal=causal)
            assert torch.equal(out, attention(q, k, v, causal=causal))


def _distributed_errors(rank, world):
    q, k, v = _qkv(seq=7)  # local length 7: N = 7P is not a multiple of 2P
    with pytest.raises(ValueError, match=f"it must be a multiple of {2 * world}"):
        context_parallel_attention(q, k, v, method="ring", layout="zigzag")
    with pytest.raises(ValueError, match=f"it must be a multiple of {2 * world}"):
        context_parallel_attention(q, k, v, method="rsa", layout="zigzag")
    # a group of size 1 inside a larger world runs plain attention
    singles = [dist.new_group([r]) for r in range(world)]
    out = context_parallel_attention(q, k, v, group=singles[rank], layout="zigzag")
    assert torch.equal(out, attention(q, k, v, causal=True))
    return True


def test_validation_errors_distributed_and_size_one_group():
    assert all(run_distributed(_distributed_errors, 2))


def test_dispatch_ring_and_rsa_match_oracle():
    cases = [dict(layout=layout, causal=True, heads=6, kv_heads=2, seq_len=28)
             for layout in ("contiguous", "zigzag", "stripe")]
    for method in ("cp:ring", "cp:rsa"):
        for case, e in zip(cases, sweep_max_errors(method, 2, cases)):
            assert max(e.values()) < F32_TOL, (method, case, e)


def _fake_modules(rank, world):
    """Stand-ins for the other methods' modules record how the dispatcher calls them."""
    calls = []

    def recorder(name):
        def fn(q, k, v, **kwargs):
            calls.append((name, sorted(kwargs.items(), key=lambda kv: kv[0])))
            return q
        return fn

    saved = {m: sys.modules.get(f"ctxscale.dist.{m}") for m in ("lightseq", "ulysses", "usp")}
    try:
        for module, fn in (("lightseq", "lightseq_attention"), ("ulysses", "ulysses_attention"),
                           ("usp", "usp_attention")):
            fake = types.ModuleType(f"ctxscale.dist.{module}")
            setattr(fake, fn, recorder(module))
            sys.modules[f"ctxscale.dist.{module}"] = fake
        q, k, v = _qkv(seq=4)
        context_parallel_attention(q, k, v, method="lightseq", causal=False, softmax_scale=0.5)
        context_parallel_attention(q, k, v, method="ulysses", layout="stripe")
        context_parallel_attention(q, k, v, method="usp", layout="zigzag", ulysses_degree=2)
    finally:
        for m, mod in saved.items():
            if mod is None:
                sys.modules.pop(f"ctxscale.dist.{m}", None)
            else:
                sys.modules[f"ctxscale.dist.{m}"] = mod
    return [(name, [(key, val) for key, val in kw if key != "group"]) for name, kw in calls]


def test_lazy_methods_called_with_the_contract():
    calls = run_distributed(_fake_modules, 2)[0]
    assert calls == [
        ("lightseq", [("causal", False), ("overlap", True), ("segments", None),
                      ("softmax_scale", 0.5)]),
        ("ulysses", [("causal", True), ("layout", "stripe"), ("segments", None),
                     ("softmax_scale", None)]),
        ("usp", [("causal", True), ("layout", "zigzag"), ("segments", None),
                 ("softmax_scale", None), ("ulysses_degree", 2)]),
    ]


def _subgroups(rank, world):
    """Two independent context-parallel groups {0,1} and {2,3}, each with its own sequence."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    mine = groups[rank // 2]
    errs = []
    for method in ("ring", "rsa"):
        for layout in ("zigzag", "stripe"):
            pairs = oracle_case(method, layout=layout, causal=True, heads=5, kv_heads=1,
                                seq_len=20, seed=rank // 2, group=mine)
            errs.append(max((g - r).abs().max().item() / s for g, r, s in pairs.values()))
    return errs


def test_ring_and_rsa_on_subgroups():
    for errs in run_distributed(_subgroups, 4):
        assert max(errs) < F32_TOL, errs
