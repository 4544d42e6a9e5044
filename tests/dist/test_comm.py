"""dist/comm.py: every wrapper moves the right data and counts the bytes its docstring states;
tracing records post/wait order; counting() resets and restores."""

from __future__ import annotations

import warnings

import torch
from ctxscale.dist import comm

from tests.harness import run_distributed


def _p2p(rank, world):
    x = torch.full((3, 5), float(rank))  # 15 float32 = 60 bytes
    comm.enable_trace(True)
    try:
        with comm.counting():
            (recv,), handle = comm.ring_shift([x], tag="hop")
            handle.wait()
            handle.wait()  # waiting twice is harmless and traced once
            back = torch.empty(3, 5)
            comm.exchange([(x, (rank - 1) % world)], [(back, (rank + 1) % world)],
                          tag="back").wait()
            stats = comm.comm_stats()
        events = comm.trace_events()
    finally:
        comm.enable_trace(False)
    assert torch.equal(recv, torch.full((3, 5), float((rank - 1) % world)))
    assert torch.equal(back, torch.full((3, 5), float((rank + 1) % world)))
    assert stats["p2p"] == {"calls": 2, "bytes_sent": 120, "bytes_received": 120}
    assert events == [("post", "hop"), ("wait", "hop"), ("post", "back"), ("wait", "back")]
    return True


def test_point_to_point_and_trace():
    assert all(run_distributed(_p2p, 4))


def _collectives(rank, world):
    e = 4  # float32
    # no deprecation warnings either (PyTorch 2.13 renamed the single-tensor collectives)
    with comm.counting(), warnings.catch_warnings():
        warnings.simplefilter("error")
        x = torch.arange(world * 2, dtype=torch.float32) + 100 * rank
        out = torch.empty_like(x)
        comm.all_to_all_single(out, x)
        # rank r receives piece r of every rank
        expect = torch.cat([torch.arange(2 * rank, 2 * rank + 2) + 100.0 * s for s in range(world)])
        assert torch.equal(out, expect)

        piece = torch.full((3,), float(rank))
        gathered = torch.empty(3 * world)
        comm.all_gather_into_tensor(gathered, piece)
        assert torch.equal(gathered, torch.arange(world).float().repeat_interleave(3))

        t = torch.full((world * 2,), float(rank + 1))
        comm.all_reduce(t)
        assert torch.equal(t, torch.full((world * 2,), world * (world + 1) / 2))

        red = torch.empty(2)
        comm.reduce_scatter_tensor(red, torch.arange(world * 2, dtype=torch.float32))
        assert torch.equal(red, world * torch.arange(2 * rank, 2 * rank + 2).float())

        comm.record_attention_work(blocks=2, flops=10.0)
        comm.record_attention_work(blocks=1, flops=5.0)
        stats = comm.comm_stats()
    n = world * 2  # elements in the all-to-all / all-reduce tensors
    assert stats["all_to_all"]["bytes_sent"] == (n - n // world) * e
    assert stats["all_gather"]["bytes_sent"] == 3 * e * (world - 1)
    assert stats["all_reduce"]["bytes_sent"] == int(2 * (world - 1) * n * e / world)
    assert stats["reduce_scatter"]["bytes_sent"] == 2 * e * (world - 1)
    assert stats["attention"] == {"blocks": 3, "flops": 15.0}
    return True


def test_collectives_move_and_count():
    assert all(run_distributed(_collectives, 4))


def test_counting_resets_and_restores():
    comm.enable_comm_stats(False)
    comm.record("p2p", sent=1)
    assert comm.comm_stats() == {}  # off by default: nothing recorded
    with comm.counting():
        comm.record("p2p", sent=8, received=4)
        assert comm.comm_stats()["p2p"] == {"calls": 1, "bytes_sent": 8, "bytes_received": 4}
    comm.record("p2p", sent=8)
    assert comm.comm_stats()["p2p"]["calls"] == 1  # counting switched off again after the block
    comm.reset_comm_stats()
    assert comm.comm_stats() == {}


def test_p2p_delay_setting():
    comm.set_p2p_delay(0.25)
    try:
        assert comm.p2p_delay() == 0.25
    finally:
        comm.set_p2p_delay(0.0)
    assert comm.p2p_delay() == 0.0
