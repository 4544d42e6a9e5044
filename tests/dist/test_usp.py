"""USP (Ulysses x ring) against the single-process float64 oracle (tolerances derived in
tests/dist/test_ulysses.py), for every layout, and its grid/layout invariants."""

from __future__ import annotations

import pytest
import torch
from ctxscale.dist import global_positions
from ctxscale.dist.usp import default_ulysses_degree, usp_attention, usp_grid

from tests.dist.test_ulysses import assert_oracle
from tests.harness import run_distributed

LAYOUTS = ["contiguous", "zigzag", "stripe"]


@pytest.mark.parametrize("world,degree", [(8, 2), (8, 4)])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_grid_ulysses_group_tokens_are_the_ring_shard(world, degree, layout):
    n = 2 * world * 3
    ulysses_groups, ring_groups = usp_grid(world, degree, layout)
    ring_degree = world // degree
    for rho, row in enumerate(ulysses_groups):
        held = torch.cat([global_positions(n, g, world, layout) for g in row])
        assert sorted(held.tolist()) == sorted(global_positions(n, rho, ring_degree, layout).tolist())
    assert sorted(g for row in ring_groups for g in row) == list(range(world))


def test_usp_matches_oracle_p4_all_layouts():
    cases = []
    for layout in LAYOUTS:
        for causal in (True, False):
            # 5 heads over a Ulysses degree of 2: uneven head split; GQA 6q/2kv
            cases.append(dict(shape=(2, 24, 5, 5, 24), causal=causal, layout=layout,
                              seed=len(cases), kwargs={"ulysses_degree": 2}))
            cases.append(dict(shape=(1, 24, 6, 2, 24), causal=causal, layout=layout,
                              seed=len(cases), kwargs={"ulysses_degree": 2}))
    # degenerate degrees (pure ring, pure Ulysses) and the default degree (gcd-like: 4)
    cases.append(dict(shape=(1, 16, 4, 2, 8), causal=True, layout="zigzag", seed=20,
                      kwargs={"ulysses_degree": 1}))
    cases.append(dict(shape=(1, 16, 4, 2, 8), causal=True, layout="stripe", seed=21,
                      kwargs={"ulysses_degree": 4}))
    cases.append(dict(shape=(1, 16, 4, 4, 8), causal=True, layout="contiguous", seed=22))
    assert_oracle("usp", 4, cases)


def test_usp_matches_oracle_p2():
    cases = [dict(shape=(1, 20, 5, 5, 24), causal=c, layout=lay, seed=i,
                  kwargs={"ulysses_degree": 2})
             for i, (c, lay) in enumerate([(True, "zigzag"), (False, "stripe"),
                                           (True, "contiguous")])]
    assert_oracle("usp", 2, cases)


def test_usp_matches_oracle_p8():
    cases = [dict(shape=(1, 48, 4, 2, 24), causal=True, layout=lay, seed=i,
                  kwargs={"ulysses_degree": deg})
             for i, (lay, deg) in enumerate([("zigzag", 2), ("stripe", 4), ("contiguous", 2)])]
    assert_oracle("usp", 8, cases)


def test_usp_bf16():
    cases = [dict(shape=(1, 40, 4, 2, 24), causal=True, layout="zigzag", dtype=torch.bfloat16,
                  seed=3, kwargs={"ulysses_degree": 2})]
    assert_oracle("usp", 4, cases)


def _bad_degree(rank, world):
    q = torch.randn(1, 4, 6, 8)
    try:
        usp_attention(q, q, q, ulysses_degree=3)
    except ValueError as e:
        return str(e)
    return "no error"


def test_usp_degree_must_divide_world():
    for msg in run_distributed(_bad_degree, 4):
        assert "ulysses_degree=3 must divide the context-parallel size 4" in msg


def test_default_degree():
    assert default_ulysses_degree(8, 12) == 4
    assert default_ulysses_degree(4, 5) == 1
    assert default_ulysses_degree(4, 8) == 4


def _two_cp_groups(rank, world, cases):
    import torch.distributed as dist

    from tests.dist.test_ulysses import oracle_case

    groups = [dist.new_group([0, 1, 2, 3]), dist.new_group([4, 5, 6, 7])]
    group = groups[rank // 4]
    out = []
    for case in cases:  # shard and run inside this rank's 4-rank context-parallel group
        out.append(oracle_case(dist.get_rank(group), 4, "usp",
                               dict(case, kwargs=dict(case["kwargs"], group=group)), group=group))
    return out


def test_usp_on_subgroups_of_a_larger_world():
    """Two 4-rank context-parallel groups in an 8-rank world (as in data x context parallel)."""
    from tests.dist.test_ulysses import F32_TOL

    cases = [dict(shape=(1, 24, 4, 2, 24), causal=True, layout=lay, seed=i,
                  kwargs={"ulysses_degree": 2}) for i, lay in enumerate(["zigzag", "stripe"])]
    for per_rank in run_distributed(_two_cp_groups, 8, args=(cases,)):
        for errs in per_rank:
            assert max(errs.values()) <= F32_TOL, errs
