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
from ctxscale.dist.lightseq import lightseq_attention
from ctxscale.dist.ulysses import ulysses_attention
from ctxscale.dist.usp import usp_attention

__all__ = [
    "LAYOUTS",
    "comm_stats",
    "context_parallel_attention",
    "enable_comm_stats",
    "enable_trace",
    "gather_sequence",
    "global_positions",
    "lightseq_attention",
    "reset_comm_stats",
    "set_p2p_delay",
    "shard_sequence",
    "trace_events",
    "ulysses_attention",
    "usp_attention",
]
from ctxscale.dist.recurrent import (  # noqa: E402
    cp_causal_conv1d,
    cp_linear_attention,
    cp_selective_scan,
    pass_states,
)

__all__ += ["cp_causal_conv1d", "cp_linear_attention", "cp_selective_scan", "pass_states"]
