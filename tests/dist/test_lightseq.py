"""LightSeq DistAttn: float64 oracle, schedule, balance, bytes, overlap trace, errors.

The oracle and its tolerances are shared with the Ulysses tests (see the derivation in
tests/dist/test_ulysses.py: 1e-5 relative in float32, 2^-6 in bfloat16).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from ctxscale.dist import comm
from ctxscale.dist.lightseq import lightseq_attention, lightseq_schedule

from tests.dist.test_ulysses import F32_TOL, assert_oracle
from tests.harness import run_distributed


def _cases(world, dtype=torch.float32):
    n = world * 7  # 14, 28: odd chunks, not powers of two
    cases = []
    for causal in (True, False):
        cases.append(dict(shape=(2, n, 5, 5, 24), causal=causal, dtype=dtype, seed=len(cases)))
        cases.append(dict(shape=(1, n, 6, 2, 24), causal=causal, dtype=dtype, seed=len(cases)))
    return cases


@pytest.mark.parametrize("world", [2, 4])
def test_lightseq_matches_oracle(world):
    cases = _cases(world)
    cases.append(dict(shape=(1, world * 5, 4, 1, 16), causal=True, seed=7, scale=0.3,
                      kwargs={"overlap": False}))
    assert_oracle("lightseq", world, cases)


def test_lightseq_matches_oracle_p8_and_error_does_not_grow():
    """P = 8 merges up to 5 partial results per row: still within the P-independent bound."""
    cases = [dict(shape=(1, 8 * 5, 5, 5, 24), causal=True, seed=11),
             dict(shape=(1, 8 * 3, 4, 2, 24), causal=False, seed=12)]
    results = assert_oracle("lightseq", 8, cases)
    assert max(e for per_rank in results for errs in per_rank for e in errs.values()) <= F32_TOL


def test_lightseq_bf16():
    assert_oracle("lightseq", 4, _cases(4, torch.bfloat16)[:2])


# ---------------------------------------------------------------- schedule
@pytest.mark.parametrize("world", [2, 4, 6, 8])
def test_schedule_covers_every_causal_block_once_in_half_the_steps(world):
    steps = lightseq_schedule(world, causal=True)
    assert len(steps) == world // 2 + 1
    blocks = []
    for step in steps:
        for r, (own_kv, help_q) in enumerate(step):
            if own_kv is not None:
                blocks.append((r, own_kv))  # (query chunk, kv chunk)
            if help_q is not None:
                blocks.append((help_q, r))
    assert sorted(blocks) == [(i, j) for i in range(world) for j in range(i + 1)]
    per_rank = [sum((o is not None) + (h is not None) for o, h in (s[r] for s in steps))
                for r in range(world)]
    assert max(per_rank) == world // 2 + 1 and min(per_rank) == world // 2


def test_schedule_odd_world_is_a_clear_error():
    with pytest.raises(ValueError, match="even number of context-parallel ranks; got 3"):
        lightseq_schedule(3, causal=True)


def _odd_group(rank, world):
    group = dist.new_group([0, 1, 2])
    if rank == 3:
        return "skip"
    q = torch.randn(1, 4, 2, 8)
    try:
        lightseq_attention(q, q, q, group=group)
    except ValueError as e:
        return str(e)
    return "no error"


def test_odd_world_error_from_the_public_function():
    messages = run_distributed(_odd_group, 4)
    for m in messages[:3]:
        assert "needs an even number of context-parallel ranks; got 3" in m
        assert "layout='zigzag'" in m


# ---------------------------------------------------------------- bytes and balance
def _counted(rank, world, shape, causal, dtype):
    b, n, h, hk, d = shape
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(b, n // world, h, d, generator=g).to(dtype).requires_grad_()
    k = torch.randn(b, n // world, hk, d, generator=g).to(dtype).requires_grad_()
    v = torch.randn(b, n // world, hk, d, generator=g).to(dtype).requires_grad_()
    with comm.counting():
        o = lightseq_attention(q, k, v, causal=causal)
        fwd = comm.comm_stats()
        comm.reset_comm_stats()
        o.sum().backward()
        bwd = comm.comm_stats()
    return fwd, bwd


def _expected_bytes(rank, world, shape, causal, esize):
    """Closed form per rank. Q = |q_r|, K = |k_r| = |v_r| (elements), L = |lse_r| = b·h·n,
    e = element size, 4 = float32 partials.
    Causal: rank r sends kv to r+t (t = 1..P/2, r+t < P): a = min(P/2, P−1−r) times, receives
    c = min(P/2, r) kv; it helps (computes others' blocks) hp = max(0, P/2−1−r) times and is
    helped hd = max(0, r−P/2) times. Forward: helper inputs q, results (o, lse) in float32.
    Backward: helper inputs q, do (e) and lse, D (float32); results dq (helpers) and dk, dv
    (owners → kv owner, float32).
    Non-causal: kv to and from each of the P−1 others; backward adds dk, dv back in float32."""
    b, n, h, hk, d = shape
    nl = n // world
    Q, K, L = b * nl * h * d, b * nl * hk * d, b * h * nl
    if not causal:
        fwd = (world - 1) * 2 * K * esize
        return (fwd, fwd), (fwd + (world - 1) * 2 * K * 4,) * 2
    half = world // 2
    a, c = min(half, world - 1 - rank), min(half, rank)
    hp, hd = max(0, half - 1 - rank), max(0, rank - half)
    fwd_sent = a * 2 * K * esize + hd * Q * esize + hp * (Q + L) * 4
    fwd_recv = c * 2 * K * esize + hp * Q * esize + hd * (Q + L) * 4
    bwd_sent = a * 2 * K * esize + hd * (2 * Q * esize + 2 * L * 4) + hp * Q * 4 + c * 2 * K * 4
    bwd_recv = c * 2 * K * esize + hp * (2 * Q * esize + 2 * L * 4) + hd * Q * 4 + a * 2 * K * 4
    return (fwd_sent, fwd_recv), (bwd_sent, bwd_recv)


@pytest.mark.parametrize("world", [4, 8])
def test_bytes_closed_form_and_balanced_work(world):
    shape = (1, world * 6, 4, 2, 8)
    for causal, dtype in ((True, torch.float32), (True, torch.bfloat16), (False, torch.float32)):
        esize = torch.empty((), dtype=dtype).element_size()
        results = run_distributed(_counted, world, args=(shape, causal, dtype))
        for rank, (fwd, bwd) in enumerate(results):
            (fs, fr), (bs, br) = _expected_bytes(rank, world, shape, causal, esize)
            assert (fwd["p2p"]["bytes_sent"], fwd["p2p"]["bytes_received"]) == (fs, fr)
            assert (bwd["p2p"]["bytes_sent"], bwd["p2p"]["bytes_received"]) == (bs, br)
        for kind, stats in (("attention", 0), ("attention_backward", 1)):
            blocks = [r[stats][kind]["blocks"] for r in results]
            flops = [r[stats][kind]["flops"] for r in results]
            assert sum(blocks) == (world * (world + 1) // 2 if causal else world * world)
            mean = sum(flops) / world
            assert max(flops) / mean <= 1 + 1 / world, (kind, flops)


# ---------------------------------------------------------------- overlap
def _traced(rank, world, overlap):
    q = torch.randn(1, 8, 2, 8, requires_grad=True)
    comm.enable_trace(True)
    try:
        lightseq_attention(q, q, q, causal=True, overlap=overlap).sum().backward()
        return comm.trace_events()
    finally:
        comm.enable_trace(False)


def _check_overlapped(events, phase, steps):
    """Each step's inputs are posted before the previous step computes and waited on after it."""
    index = {e: i for i, e in enumerate(events)}  # last occurrence; tags are unique per event
    computes = lambda t: [i for i, (ev, tag) in enumerate(events)  # noqa: E731
                          if ev == "compute" and tag.split("-")[0] == f"{phase}{t}"]
    checked = 0
    for t in range(1, steps):
        post = index.get(("post", f"{phase}{t}"))
        if post is None:
            continue  # this rank neither sends nor receives inputs at step t
        prev, cur = computes(t - 1), computes(t)
        wait = index[("wait", f"{phase}{t}")]
        if prev:
            assert post < min(prev) and wait > max(prev), (phase, t, events)
            checked += 1
        if cur:
            assert wait < min(cur)
    return checked


def test_trace_next_transfer_posted_before_current_compute():
    world = 4
    steps = world // 2 + 1
    for events in run_distributed(_traced, world, args=(True,)):
        checked = sum(_check_overlapped(events, p, steps) for p in ("fwd", "bwd"))
        assert checked >= 2  # every rank overlaps at least one transfer in each direction
    for events in run_distributed(_traced, world, args=(False,)):
        for i, (ev, tag) in enumerate(events):  # synchronous: every post is waited on at once
            if ev == "post":
                assert events[i + 1] == ("wait", tag)
