"""DeepSpeed-Ulysses attention against a single-process float64 oracle on the full sequence.

Oracle pattern: every rank builds the same global q, k, v, do (seeded), computes
`attention_reference` in float64 on the full sequence with autograd, shards inputs with the
layout, runs the distributed method, and compares its local output and local dq, dk, dv with the
reference's shard.

Tolerances (error = max|x − ref| / max|ref| over the tensor, so near-zero entries do not blow up):
- float32: the methods are exact algorithms; every output or gradient entry is a short chain of
  float32 dot products over ≤ N·d terms and a few exp/log/rescale steps. Each rounding costs at
  most u = 2^-24 ≈ 6e-8 relative; summation errors grow like √(terms)·u ≈ 20·u for ≤ 400 terms,
  plus ≤ P/2+1 log-sum-exp merges of partial outputs (a few u each): ~1e-6 at these sizes, so
  1e-5 leaves a 10x margin. The bound is independent of P and asserted at P = 2, 4 and 8.
- bfloat16: inputs are rounded to bf16 once (the reference uses the same rounded values in
  float64). The output is rounded to bf16 (≤ 2^-9 relative), the local kernels round the
  probabilities before the P·V matmul and the gradients to bf16 (≤ 2^-9 each, errors of a sum
  partly cancel); four such roundings on the same entry bound the error by 4 · 2^-9 · 2 (the
  factor 2: an entry's error relative to the tensor's max can double through one rescale) =
  2^-6 ≈ 1.6e-2. We assert 2^-6 for outputs and gradients.
"""

from __future__ import annotations

import pytest
import torch
from ctxscale.dist import comm, shard_sequence
from ctxscale.kernels import attention_reference

from tests.harness import run_distributed

F32_TOL = 1e-5
BF16_TOL = 2.0**-6


def _relerr(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    return ((x.double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _method(name):
    if name == "ulysses":
        from ctxscale.dist.ulysses import ulysses_attention

        return ulysses_attention
    if name == "lightseq":
        from ctxscale.dist.lightseq import lightseq_attention

        return lightseq_attention
    if name == "usp":
        from ctxscale.dist.usp import usp_attention

        return usp_attention
    raise AssertionError(name)


def oracle_case(rank, world, method, case, group=None):
    """One oracle comparison; returns {'o','dq','dk','dv': relative error}."""
    b, n, h, hk, d = case["shape"]
    causal, layout = case["causal"], case.get("layout", "contiguous")
    dtype = case.get("dtype", torch.float32)
    g = torch.Generator().manual_seed(case.get("seed", 0))
    q, k, v = (torch.randn(b, n, hh, d, generator=g, dtype=torch.float64) for hh in (h, hk, hk))
    do = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    q, k, v, do = (t.to(dtype).double() for t in (q, k, v, do))  # the values every path sees
    scale = case.get("scale")

    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref, _ = attention_reference(*ref_in, causal=causal, softmax_scale=scale)
    o_ref.backward(do)

    kwargs = dict(case.get("kwargs", {}))
    if method != "lightseq":
        kwargs["layout"] = layout
    local = [shard_sequence(t, group=group, layout=layout).to(dtype).requires_grad_() for t in (q, k, v)]
    o = _method(method)(*local, causal=causal, softmax_scale=scale, **kwargs)
    assert o.dtype == dtype and o.shape == local[0].shape
    o.backward(shard_sequence(do, group=group, layout=layout).to(dtype))
    errs = {"o": _relerr(o, shard_sequence(o_ref, group=group, layout=layout))}
    for name, x, r in zip(("dq", "dk", "dv"), local, ref_in):
        assert x.grad.dtype == dtype
        errs[name] = _relerr(x.grad, shard_sequence(r.grad, group=group, layout=layout))
    return errs


def run_oracle_cases(rank, world, method, cases):
    return [oracle_case(rank, world, method, c) for c in cases]


def assert_oracle(method, world, cases):
    """Run all `cases` in one distributed call and check every rank's errors."""
    results = run_distributed(run_oracle_cases, world, args=(method, cases))
    for r, per_rank in enumerate(results):
        for case, errs in zip(cases, per_rank):
            tol = BF16_TOL if case.get("dtype") == torch.bfloat16 else F32_TOL
            bad = {k: e for k, e in errs.items() if not e <= tol}
            assert not bad, f"{method} P={world} rank {r} case {case}: errors {bad} > {tol}"
    return results


def _cases(world, layouts, dtype=torch.float32):
    cases = []
    for layout in layouts:
        n = 2 * world * (3 if world > 2 else 5)  # 20 at P=2, 24 at P=4: not powers of two
        for causal in (True, False):
            # MHA with 5 heads where 5 heads shard (P <= 5; uneven split at P = 2 and 4),
            # GQA 4q/2kv (kv heads < P at P=4: replication), head_dim 24.
            cases.append(dict(shape=(2, n, 5, 5, 24), causal=causal, layout=layout, dtype=dtype,
                              seed=len(cases)))
            cases.append(dict(shape=(1, n, 8, 2, 24), causal=causal, layout=layout, dtype=dtype,
                              seed=len(cases)))
    return cases


LAYOUTS = ["contiguous", "zigzag", "stripe"]


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_matches_oracle(world):
    assert_oracle("ulysses", world, _cases(world, LAYOUTS))


def test_ulysses_matches_oracle_p8():
    cases = [dict(shape=(1, 48, 8, 8, 24), causal=True, layout=lay, seed=i)
             for i, lay in enumerate(LAYOUTS)]
    cases.append(dict(shape=(1, 32, 8, 2, 16), causal=True, layout="zigzag", seed=9))  # kv rep x4
    assert_oracle("ulysses", 8, cases)


def test_ulysses_bf16():
    cases = [dict(shape=(1, 40, 4, 2, 24), causal=c, layout=lay, dtype=torch.bfloat16, seed=i)
             for i, (c, lay) in enumerate([(True, "zigzag"), (False, "contiguous"),
                                           (True, "stripe")])]
    assert_oracle("ulysses", 2, cases)


# ---------------------------------------------------------------- head plans
def test_head_plan_partitions_and_replicates_minimally():
    from ctxscale.dist.ulysses import head_plan

    # kv heads divide P: a partition, no copies
    q, kv = head_plan(8, 4, 4)
    assert [list(r) for r in q] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert kv == [[0], [1], [2], [3]]
    # fewer kv heads than ranks: each kv head goes to the P/kv ranks that read it, once each
    q, kv = head_plan(8, 2, 4)
    assert kv == [[0], [0], [1], [1]]
    # uneven query heads (5 over 4 ranks) with GQA 10q/5kv misaligned with the ranges
    q, kv = head_plan(10, 5, 4)
    assert [len(r) for r in q] == [3, 3, 2, 2]
    for r, heads in zip(q, kv):  # local GQA mapping reads the right global kv head
        group = len(r) // len(heads)
        assert all(h // 2 == heads[i // group] for i, h in enumerate(r))
    assert kv[0] == [0, 0, 1]  # q heads 0,1,2 read kv 0,0,1: 3 local kv heads needed
    assert kv[2] == [3]  # q heads 6,7 both read kv 3


def test_ulysses_head_errors():
    from ctxscale.dist.ulysses import head_plan

    with pytest.raises(ValueError, match="3 query heads cannot be split over 4 ranks"):
        head_plan(3, 3, 4)
    with pytest.raises(ValueError, match="multiple of the number of key/value heads"):
        head_plan(6, 4, 2)


# ---------------------------------------------------------------- bytes
def _bytes_case(rank, world, shape, dtype):
    from ctxscale.dist.ulysses import ulysses_attention

    b, n, h, hk, d = shape
    torch.manual_seed(0)
    q = torch.randn(b, n // world, h, d, dtype=dtype, requires_grad=True)
    k = torch.randn(b, n // world, hk, d, dtype=dtype, requires_grad=True)
    v = torch.randn(b, n // world, hk, d, dtype=dtype, requires_grad=True)
    with comm.counting():
        o = ulysses_attention(q, k, v, layout="zigzag", causal=True)
        fwd = comm.comm_stats()["all_to_all"]
        comm.reset_comm_stats()
        o.sum().backward()
        bwd = comm.comm_stats()["all_to_all"]
    return fwd, bwd


def test_ulysses_bytes_closed_form():
    """Each all-to-all sends (P−1)/P of the tensor it moves. Forward moves q, k, v (one call)
    and o (one call); backward moves do (one call) and dq, dk, dv (one call). Equal heads, so
    per rank: sent = received = (P−1)/P · (|q| + |k| + |v| + |o|) each way."""
    world, shape = 4, (2, 24, 8, 4, 24)
    b, n, h, hk, d = shape
    for dtype in (torch.float32, torch.bfloat16):
        results = run_distributed(_bytes_case, world, args=(shape, dtype))
        esize = torch.empty((), dtype=dtype).element_size()
        local = b * (n // world) * d * esize
        expected = (world - 1) * local * (h + hk + hk + h) // world
        for fwd, bwd in results:
            for stats in (fwd, bwd):
                assert stats["calls"] == 2
                assert stats["bytes_sent"] == expected
                assert stats["bytes_received"] == expected


def _replicated_bytes(rank, world):
    from ctxscale.dist.ulysses import ulysses_attention

    b, n, h, hk, d = 1, 16, 4, 1, 8  # one kv head read by all 4 ranks: 4 copies (P−1 sent)
    q = torch.randn(b, n // world, h, d)
    k = torch.randn(b, n // world, hk, d)
    with comm.counting():
        ulysses_attention(q, k, k.clone(), causal=True)
        return comm.comm_stats()["all_to_all"]


def test_ulysses_bytes_with_kv_replication():
    world = 4
    per_head = 1 * 4 * 8 * 4  # b · n/P · d · 4 bytes
    for stats in run_distributed(_replicated_bytes, world):
        # q: 3 of 4 heads leave; k, v: the one local kv head goes to the 3 other ranks; o: 3/4
        expected = 3 * per_head + 2 * 3 * per_head + 3 * per_head
        assert stats["bytes_sent"] == expected
        assert stats["bytes_received"] == expected
