import pytest
import torch
import torch.distributed as dist

from tests.harness import run_distributed


def _sum_ranks(rank, world_size, n):
    x = torch.full((n,), float(rank))
    dist.all_reduce(x)
    return x.tolist()


def _fail_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("boom on rank one")
    return rank


def _deadlock(rank, world_size):
    if rank == 0:
        dist.recv(torch.zeros(1), src=1)  # rank 1 never sends


@pytest.mark.parametrize("world_size", [2, 4])
def test_collective_results_come_back(world_size):
    out = run_distributed(_sum_ranks, world_size, args=(3,))
    expected = float(sum(range(world_size)))
    assert out == [[expected] * 3] * world_size


def test_failure_reports_rank_traceback():
    with pytest.raises(AssertionError, match="boom on rank one"):
        run_distributed(_fail_on_rank_one, 2)
    # the pool is rebuilt and usable afterwards
    assert run_distributed(_sum_ranks, 2, args=(1,)) == [[1.0], [1.0]]


def test_deadlock_fails_instead_of_hanging():
    with pytest.raises(TimeoutError, match="timed out"):
        run_distributed(_deadlock, 2, timeout=5)
    assert run_distributed(_sum_ranks, 2, args=(1,)) == [[1.0], [1.0]]


def _die_on_rank_one(rank, world_size):
    import os

    if rank == 1:
        os._exit(7)  # as a crash would: no exception, no answer
    dist.barrier()


def test_a_crashed_worker_is_named_with_its_exit_code():
    with pytest.raises(TimeoutError, match=r"lost a worker process \(rank: exit code \{1: 7\}\) "
                                           r"after \d+s \(limit 60s\)"):
        run_distributed(_die_on_rank_one, 2, timeout=60)
    assert run_distributed(_sum_ranks, 2, args=(1,)) == [[1.0], [1.0]]
