"""`context_parallel_attention`: one entry point for exact softmax attention over a sequence
sharded across a context-parallel group.

q: `(batch, seq_local, heads, head_dim)`, k/v: `(batch, seq_local, kv_heads, head_dim)`, this
rank's shard of a global sequence of N = seq_local · P tokens in `layout`; the output is this
rank's shard `(batch, seq_local, heads, head_dim)` in the same layout. Methods:

| method     | paper                                                         | layouts        |
|------------|---------------------------------------------------------------|----------------|
| `rsa`      | Li et al. 2021, Ring Self-Attention (`dist/rsa.py`)           | all            |
| `ring`     | Liu et al. 2023, Ring Attention (`dist/ring.py`)              | all            |
| `lightseq` | Li et al. 2023, LightSeq DistAttn (`dist/lightseq.py`)        | contiguous     |
| `ulysses`  | Jacobs et al. 2023, DeepSpeed-Ulysses (`dist/ulysses.py`)     | all            |
| `usp`      | Fang & Zhao 2024, Unified Sequence Parallelism (`dist/usp.py`) | all            |

A group of size 1 (or no initialized process group) runs plain `ctxscale.kernels.attention`.
"""

from __future__ import annotations

import importlib

from ctxscale.dist.layout import LAYOUTS, check_divisible
from ctxscale.dist.ring import check_global_segments, group_rank_world, ring_attention
from ctxscale.dist.rsa import ring_self_attention

METHODS = ("rsa", "ring", "lightseq", "ulysses", "usp")
METHOD_LAYOUTS = {
    "rsa": LAYOUTS,
    "ring": LAYOUTS,
    "lightseq": ("contiguous",),
    "ulysses": LAYOUTS,
    "usp": LAYOUTS,
}


def _lazy(module: str, name: str):
    """Import `ctxscale.dist.<module>.<name>` when first used."""
    try:
        mod = importlib.import_module(f"ctxscale.dist.{module}")
    except ImportError as err:
        raise ValueError(
            f"context-parallel method {module!r} needs ctxscale.dist.{module}, which could not be "
            f"imported ({err}); use method='ring' or 'rsa'"
        ) from err
    return getattr(mod, name)


def validate(q, k, v, *, world: int, method: str, layout: str, ulysses_degree=None) -> None:
    """Raise ValueError naming the problem and the fix for unusable arguments."""
    if method not in METHODS:
        raise ValueError(f"unknown context-parallel method {method!r}; choose one of {METHODS}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown sequence layout {layout!r}; choose one of {LAYOUTS}")
    if layout not in METHOD_LAYOUTS[method]:
        raise ValueError(
            f"method {method!r} does not support layout {layout!r}; it supports "
            f"{METHOD_LAYOUTS[method]} (or pick a method that supports {layout!r}: "
            f"{tuple(m for m in METHODS if layout in METHOD_LAYOUTS[m])})"
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            "context_parallel_attention expects (batch, seq_local, heads, head_dim) tensors; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    if not (q.shape[1] == k.shape[1] == v.shape[1]):
        raise ValueError(
            f"q, k and v must be shards of the same sequence; got local lengths {q.shape[1]}, "
            f"{k.shape[1]}, {v.shape[1]}"
        )
    if q.shape[2] % k.shape[2] != 0:
        raise ValueError(
            f"q has {q.shape[2]} heads and k/v {k.shape[2]}: the number of query heads must be a "
            "multiple of the number of key/value heads (grouped-query attention)"
        )
    if ulysses_degree not in (None, 1) and method != "usp":
        raise ValueError(
            f"ulysses_degree={ulysses_degree} is only used by method='usp', not {method!r}; "
            "drop it or use method='usp'"
        )
    if world > 1:  # with one rank every layout is the identity
        check_divisible(q.shape[1] * world, world, layout)


def context_parallel_attention(q, k, v, *, group=None, method="ring", layout="contiguous",
                               causal=True, softmax_scale=None, ulysses_degree=None,
                               segments=None):
    """Exact softmax attention of this rank's shard against the whole sharded sequence (see the
    module docstring for shapes, methods and layouts). `segments`: the global `(batch, N)`
    document ids for document masking (every method; the same tensor on every rank)."""
    _, world = group_rank_world(group)
    validate(q, k, v, world=world, method=method, layout=layout, ulysses_degree=ulysses_degree)
    check_global_segments(segments, q, world, "context_parallel_attention")
    if world == 1:
        from ctxscale.kernels import attention

        from ctxscale.kernels.attention_tiles import _segment_kwargs

        return attention(q, k, v, causal=causal, softmax_scale=softmax_scale,
                         **_segment_kwargs(segments, segments))
    common = dict(group=group, causal=causal, softmax_scale=softmax_scale, segments=segments)
    if method == "ring":
        return ring_attention(q, k, v, layout=layout, **common)
    if method == "rsa":
        return ring_self_attention(q, k, v, layout=layout, **common)
    if method == "lightseq":
        fn = _lazy("lightseq", "lightseq_attention")
        return fn(q, k, v, overlap=True, **common)
    if method == "ulysses":
        fn = _lazy("ulysses", "ulysses_attention")
        return fn(q, k, v, layout=layout, **common)
    fn = _lazy("usp", "usp_attention")
    return fn(q, k, v, layout=layout, ulysses_degree=ulysses_degree, **common)


__all__ = ["METHODS", "METHOD_LAYOUTS", "context_parallel_attention"]
