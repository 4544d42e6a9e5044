"""Process groups, communication with byte accounting, and context-parallel building blocks."""

from ctxscale.dist.comm import (
    comm_stats,
    enable_comm_stats,
    enable_trace,
    reset_comm_stats,
    set_p2p_delay,
    trace_events,
)
from ctxscale.dist.context_parallel import context_parallel_attention
from ctxscale.dist.layout import LAYOUTS, gather_sequence, global_positions, shard_sequence

__all__ = [
    "LAYOUTS",
    "comm_stats",
    "context_parallel_attention",
    "enable_comm_stats",
    "enable_trace",
    "gather_sequence",
    "global_positions",
    "reset_comm_stats",
    "set_p2p_delay",
    "shard_sequence",
    "trace_events",
]
