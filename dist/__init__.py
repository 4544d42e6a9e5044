"""Process groups, communication with byte accounting, and context-parallel building blocks."""

from ctxscale.dist.comm import (
    comm_stats,
    enable_comm_stats,
    enable_trace,
    reset_comm_stats,
    set_p2p_delay,
    trace_events,
)
from ctxscale.dist.layout import LAYOUTS, gather_sequence, global_positions, shard_sequence

__all__ = [
    "LAYOUTS",
    "comm_stats",
    "enable_comm_stats",
    "enable_trace",
    "gather_sequence",
    "global_positions",
    "reset_comm_stats",
    "set_p2p_delay",
    "shard_sequence",
    "trace_events",
]
from ctxscale.dist.recurrent import (  # noqa: E402
    cp_causal_conv1d,
    cp_linear_attention,
    cp_selective_scan,
    pass_states,
)

__all__ += ["cp_causal_conv1d", "cp_linear_attention", "cp_selective_scan", "pass_states"]
