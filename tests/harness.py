"""Run a function on N gloo processes, failing (not hanging) on deadlock.

    from tests.harness import run_distributed

    def _check(rank, world_size, n):          # module-level, so it pickles by name
        x = torch.full((n,), float(rank))
        dist.all_reduce(x)
        assert x[0] == sum(range(world_size))

    def test_all_reduce():
        run_distributed(_check, world_size=4, args=(3,))

Processes are kept in a pool per world size for the whole pytest session (starting Python and
importing torch is the slow part), each with a gloo process group over the whole pool already
initialized. A task that raises on any rank fails the test with that rank's traceback; a task
that runs past `timeout` seconds fails the test and the pool is torn down and rebuilt, so a
deadlock costs one test, not the suite. Return values of rank 0..N-1 come back as a list.
"""

from __future__ import annotations

import atexit
import os
import queue
import socket
import time
import traceback

import torch.multiprocessing as mp

DEFAULT_TIMEOUT = float(os.environ.get("CTXSCALE_TEST_TIMEOUT", "180"))
ERROR_GRACE = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, tasks, results, env):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    while True:
        item = tasks.get()
        if item is None:
            break
        task_id, fn, args, kwargs = item
        try:
            value = fn(rank, world_size, *args, **kwargs)
            results.put((task_id, rank, True, value))
        except BaseException:  # noqa: BLE001 - the traceback goes back to the test
            results.put((task_id, rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class DistributedPool:
    """N persistent worker processes joined in one gloo process group."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        ctx = mp.get_context("spawn")
        self._tasks = [ctx.Queue() for _ in range(world_size)]
        self._results = ctx.Queue()
        env = {"OMP_NUM_THREADS": "1", "CTXSCALE_TEST_WORKER": "1"}
        port = _free_port()
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, self._tasks[r], self._results, env),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in self._procs:
            p.start()
        self._next_id = 0

    def alive(self) -> bool:
        return all(p.is_alive() for p in self._procs)

    def run(self, fn, args=(), kwargs=None, timeout=DEFAULT_TIMEOUT):
        self._next_id += 1
        task_id = self._next_id
        for q in self._tasks:
            q.put((task_id, fn, tuple(args), dict(kwargs or {})))
        values: dict[int, object] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        first_error_at = None
        while len(values) + len(errors) < self.world_size:
            now = time.monotonic()
            if first_error_at is not None and now - first_error_at > ERROR_GRACE:
                break  # the other ranks are likely blocked in a collective with the failed one
            if now >= deadline or not self.alive():
                # exit codes before the forced close: -11 is a segfault, -9 a kill (OOM)
                dead = {r: p.exitcode for r, p in enumerate(self._procs) if not p.is_alive()}
                self.close(force=True)
                done = sorted(values) + sorted(errors)
                why = ("timed out" if now >= deadline else
                       f"lost a worker process (rank: exit code {dead})")
                took = timeout - (deadline - now)
                msg = (
                    f"{fn.__name__} {why} after {took:.0f}s (limit {timeout:.0f}s) on "
                    f"{self.world_size} ranks; ranks that finished: {done}"
                )
                if errors:
                    msg += "\n" + "\n".join(f"--- rank {r} ---\n{e}" for r, e in errors.items())
                raise TimeoutError(msg)
            try:
                tid, rank, ok, value = self._results.get(timeout=min(deadline - now, 1.0))
            except queue.Empty:
                continue
            if tid != task_id:
                continue  # a late answer from an earlier, failed task
            (values if ok else errors)[rank] = value
            if not ok and first_error_at is None:
                first_error_at = time.monotonic()
        if errors:
            details = "\n".join(f"--- rank {r} ---\n{e}" for r, e in sorted(errors.items()))
            raise AssertionError(f"{fn.__name__} failed on ranks {sorted(errors)}:\n{details}")
        return [values[r] for r in range(self.world_size)]

    def close(self, force: bool = False):
        for p, q in zip(self._procs, self._tasks):
            if p.is_alive() and not force:
                q.put(None)
        for p in self._procs:
            if force:
                p.kill()
            p.join(timeout=5)
            if p.is_alive():
                p.kill()


_pools: dict[int, DistributedPool] = {}


def get_pool(world_size: int) -> DistributedPool:
    pool = _pools.get(world_size)
    if pool is None or not pool.alive():
        pool = DistributedPool(world_size)
        _pools[world_size] = pool
    return pool


def run_distributed(fn, world_size: int, args=(), kwargs=None, timeout=DEFAULT_TIMEOUT):
    """Run `fn(rank, world_size, *args, **kwargs)` on every rank of a gloo pool; see module doc.

    If any rank fails, the pool is discarded (its peers may be stuck in a collective) and the
    test fails with the tracebacks.
    """
    pool = get_pool(world_size)
    try:
        return pool.run(fn, args, kwargs, timeout)
    except AssertionError:
        pool.close(force=True)
        _pools.pop(world_size, None)
        raise
    except TimeoutError:
        _pools.pop(world_size, None)
        raise


@atexit.register
def _shutdown():
    for pool in list(_pools.values()):
        pool.close()
    _pools.clear()
