"""Communication with byte accounting, attention-work accounting, event tracing and delay injection.

Every collective and point-to-point call in `ctxscale.dist` goes through the wrappers here, so a
run can read, per rank, how many bytes each kind of call sent and received and how much attention
work this rank did:

    enable_comm_stats(True); reset_comm_stats()
    ... one training step ...
    comm_stats()  # {'p2p': {'calls': 6, 'bytes_sent': ..., 'bytes_received': ...},
                  #  'attention': {'blocks': 4, 'flops': ...}, ...}

Counting is off by default; when on it costs one dict update per call.

Two test and benchmark aids live here too:
- `set_p2p_delay(seconds)`: every point-to-point hop completes no earlier than `seconds` after it
  was posted (a wait sleeps for the remainder), which models a slow link. Work done between
  posting and waiting hides the delay; a synchronous schedule pays it in full.
- `enable_trace(True)`: records ('post', tag), ('wait', tag), ('compute', tag) events in order,
  so a test can check that the next hop is posted before the current block computes and waited
  on only after it.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch
import torch.distributed as dist

_stats_on = False
_stats: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
_trace_on = False
_trace: list[tuple[str, str]] = []
_p2p_delay = 0.0


# ---------------------------------------------------------------- accounting
def enable_comm_stats(enabled: bool = True) -> None:
    global _stats_on
    _stats_on = enabled


def reset_comm_stats() -> None:
    _stats.clear()


def comm_stats() -> dict[str, dict[str, float]]:
    """Counters since the last reset: {kind: {'calls', 'bytes_sent', 'bytes_received', ...}}."""
    return {k: dict(v) for k, v in _stats.items()}


@contextmanager
def counting():
    """Count communication inside the block (resets first); restores the previous setting."""
    global _stats_on
    previous = _stats_on
    _stats_on = True
    reset_comm_stats()
    try:
        yield
    finally:
        _stats_on = previous


def record(kind: str, *, sent: int = 0, received: int = 0, calls: int = 1) -> None:
    if _stats_on:
        entry = _stats[kind]
        entry["calls"] += calls
        entry["bytes_sent"] += sent
        entry["bytes_received"] += received


def record_attention_work(*, blocks: int = 1, flops: float = 0.0, kind: str = "attention") -> None:
    """Attention work done on this rank: blocks computed and their matmul FLOPs."""
    if _stats_on:
        entry = _stats[kind]
        entry["blocks"] += blocks
        entry["flops"] += flops


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ---------------------------------------------------------------- tracing and delay
def enable_trace(enabled: bool = True) -> None:
    global _trace_on
    _trace_on = enabled
    _trace.clear()


def trace_events() -> list[tuple[str, str]]:
    return list(_trace)


def trace(event: str, tag: str = "") -> None:
    if _trace_on:
        _trace.append((event, tag))


def set_p2p_delay(seconds: float) -> None:
    """Make every point-to-point hop take at least `seconds` from post to completion."""
    global _p2p_delay
    _p2p_delay = float(seconds)


def p2p_delay() -> float:
    return _p2p_delay


class P2PHandle:
    """Handles of one batch of point-to-point ops, waited on together."""

    def __init__(self, works, tag: str, posted_at: float):
        self._works = works
        self.tag = tag
        self._posted_at = posted_at
        self._done = False

    def wait(self) -> None:
        if self._done:
            return
        for w in self._works:
            w.wait()
        if _p2p_delay > 0:
            remaining = self._posted_at + _p2p_delay - time.perf_counter()
            if remaining > 0:
                time.sleep(remaining)
        trace("wait", self.tag)
        self._done = True


# ---------------------------------------------------------------- point to point
def exchange(
    sends: list[tuple[torch.Tensor, int]],
    recvs: list[tuple[torch.Tensor, int]],
    *,
    group=None,
    tag: str = "p2p",
    kind: str = "p2p",
) -> P2PHandle:
    """Post sends `(tensor, dst_group_rank)` and receives `(buffer, src_group_rank)` together with
    `batch_isend_irecv`; returns a handle to wait on. Ranks are ranks *within* `group`."""
    ops = []
    for t, peer in sends:
        ops.append(dist.P2POp(dist.isend, t.contiguous(), _global_rank(group, peer), group))
    for t, peer in recvs:
        ops.append(dist.P2POp(dist.irecv, t, _global_rank(group, peer), group))
    record(
        kind,
        sent=sum(_nbytes(t) for t, _ in sends),
        received=sum(_nbytes(t) for t, _ in recvs),
        calls=1,
    )
    trace("post", tag)
    works = dist.batch_isend_irecv(ops) if ops else []
    return P2PHandle(works, tag, time.perf_counter())


def ring_shift(
    tensors: list[torch.Tensor], *, group=None, direction: int = 1, tag: str = "ring"
) -> tuple[list[torch.Tensor], P2PHandle]:
    """Send each tensor to rank+direction and receive the same shapes from rank-direction (ring
    over `group`). Returns (receive buffers, handle); read the buffers only after `wait()`."""
    world = dist.get_world_size(group)
    rank = dist.get_rank(group)
    dst = (rank + direction) % world
    src = (rank - direction) % world
    bufs = [torch.empty_like(t) for t in tensors]
    handle = exchange([(t, dst) for t in tensors], [(b, src) for b in bufs], group=group, tag=tag)
    return bufs, handle


def _global_rank(group, group_rank: int) -> int:
    if group is None or group is dist.group.WORLD:
        return group_rank
    return dist.get_global_rank(group, group_rank)


# ---------------------------------------------------------------- collectives
def all_to_all_single(
    output: torch.Tensor,
    input: torch.Tensor,
    *,
    group=None,
    kind="all_to_all",
    output_split_sizes: list[int] | None = None,
    input_split_sizes: list[int] | None = None,
):
    """All-to-all along dim 0: equal splits, or the given split sizes (rows of dim 0 sent to /
    received from each rank, as in `torch.distributed.all_to_all_single`). Counts the bytes that
    leave / reach this rank (its own split stays local and is not counted)."""
    world = dist.get_world_size(group)
    if output_split_sizes is None and input_split_sizes is None:
        own_in, own_out = _nbytes(input) // world, _nbytes(output) // world
    else:
        rank = dist.get_rank(group)
        row_in = _nbytes(input) // max(input.shape[0], 1)
        row_out = _nbytes(output) // max(output.shape[0], 1)
        own_in = row_in * (input_split_sizes[rank] if input_split_sizes else input.shape[0] // world)
        own_out = row_out * (
            output_split_sizes[rank] if output_split_sizes else output.shape[0] // world
        )
    record(kind, sent=_nbytes(input) - own_in, received=_nbytes(output) - own_out)
    dist.all_to_all_single(
        output,
        input.contiguous(),
        output_split_sizes=output_split_sizes,
        input_split_sizes=input_split_sizes,
        group=group,
    )
    return output


# PyTorch 2.13 renamed the single-tensor collectives (the old names warn with a FutureWarning
# on every call); torch>=2.5 is supported, so take whichever this build has
_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def all_gather_into_tensor(output: torch.Tensor, input: torch.Tensor, *, group=None, kind="all_gather"):
    """Gather equal pieces along dim 0. Bytes: this rank's piece to each of the P-1 peers."""
    world = dist.get_world_size(group)
    record(kind, sent=_nbytes(input) * (world - 1), received=_nbytes(input) * (world - 1))
    _ALL_GATHER(output, input.contiguous(), group=group)
    return output


def all_reduce(t: torch.Tensor, *, op=dist.ReduceOp.SUM, group=None, kind="all_reduce"):
    """All-reduce in place. Bytes counted as a ring all-reduce: 2·(P−1)/P of the tensor each way."""
    world = dist.get_world_size(group)
    volume = int(2 * (world - 1) * _nbytes(t) / world)
    record(kind, sent=volume, received=volume)
    dist.all_reduce(t, op=op, group=group)
    return t


def reduce_scatter_tensor(output, input, *, op=dist.ReduceOp.SUM, group=None, kind="reduce_scatter"):
    world = dist.get_world_size(group)
    record(kind, sent=_nbytes(output) * (world - 1), received=_nbytes(output) * (world - 1))
    _REDUCE_SCATTER(output, input.contiguous(), op=op, group=group)
    return output
