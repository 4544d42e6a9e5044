"""Document masking under context parallelism: every method (ring in each layout, RSA, LightSeq,
Ulysses, USP) with the global document ids gives this rank's shard of single-process attention
with the same ids (float64 reference, outputs and dq/dk/dv), and ring skips the blocks between
shards that share no document.

Tolerance: float32 against float64, normwise, 1e-5 (derived in tests/dist/test_ring.py; masking
only removes terms).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from ctxscale.dist import comm, context_parallel_attention, shard_sequence
from ctxscale.kernels.attention import attention_reference

from tests.dist.test_ring import F32_TOL, _global_inputs
from tests.harness import run_distributed


def packed_segments(lengths_per_row, seq_len):
    """(batch, seq_len) document ids from document lengths per batch row (the last document
    runs to the end)."""
    rows = []
    for lengths in lengths_per_row:
        ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        ids = torch.cat([ids, torch.full((seq_len - ids.numel(),), len(lengths))])[:seq_len]
        rows.append(ids)
    return torch.stack(rows)


# N = 56: documents that start inside shards, a 1-token document, and a row with one document
SEGMENTS = packed_segments([[9, 1, 20, 13], [56]], 56)


def _case(rank, world, method, layout, causal, heads, kv_heads, extra):
    q, k, v, do = _global_inputs(56, heads, kv_heads, seed=3)
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    o_ref, _ = attention_reference(*ref_in, causal=causal, q_segments=SEGMENTS,
                                   k_segments=SEGMENTS)
    o_ref.backward(do)
    refs = [o_ref.detach()] + [x.grad for x in ref_in]
    shard = partial(shard_sequence, layout=layout)
    local = [shard(x).float().requires_grad_() for x in (q, k, v)]
    o = context_parallel_attention(*local, method=method, layout=layout, causal=causal,
                                   segments=SEGMENTS, **extra)
    o.backward(shard(do).float())
    errs = {}
    for name, got, ref in zip(("o", "dq", "dk", "dv"), [o.detach()] + [x.grad for x in local], refs):
        assert torch.isfinite(got).all(), name
        errs[name] = (got.double() - shard(ref)).abs().max().item() / ref.abs().max().item()
    return errs


CASES = [
    ("ring", "contiguous", True, {}), ("ring", "zigzag", True, {}), ("ring", "stripe", True, {}),
    ("ring", "zigzag", False, {}), ("rsa", "zigzag", True, {}), ("lightseq", "contiguous", True, {}),
    ("lightseq", "contiguous", False, {}), ("ulysses", "stripe", True, {}),
    ("ulysses", "contiguous", False, {}),
]


def _sweep(rank, world, cases):
    return [_case(rank, world, m, lay, c, 6, 2, x) for m, lay, c, x in cases]


@pytest.mark.parametrize("world", [2, 4])
def test_every_method_matches_single_process_with_documents(world):
    cases = CASES + ([("usp", "zigzag", True, {"ulysses_degree": 2})] if world == 4 else [])
    per_rank = run_distributed(_sweep, world, args=(cases,), timeout=300)
    for i, case in enumerate(cases):
        worst = {n: max(r[i][n] for r in per_rank) for n in per_rank[0][i]}
        assert max(worst.values()) < F32_TOL, (world, case, worst)


def _blocks(rank, world):
    """Ring attention work per rank with one document per shard vs one document overall."""
    q, k, v, _ = _global_inputs(32, 2, 2, batch=1, seed=1)
    counts = {}
    for name, seg in (("per_shard", torch.arange(32).div(32 // world, rounding_mode="floor")),
                      ("one_doc", torch.zeros(32, dtype=torch.long))):
        comm.enable_comm_stats(True)
        comm.reset_comm_stats()
        local = [shard_sequence(x.float(), layout="contiguous").requires_grad_() for x in (q, k, v)]
        o = context_parallel_attention(*local, method="ring", layout="contiguous", causal=True,
                                       segments=seg[None])
        o.sum().backward()
        stats = comm.comm_stats()
        counts[name] = stats["attention"]["blocks"] + stats["attention_backward"]["blocks"]
        comm.enable_comm_stats(False)
    return counts


def test_ring_skips_blocks_between_shards_without_a_shared_document():
    """Documents that never cross a shard boundary leave only the diagonal block per rank (one
    forward and one backward), while one long document keeps rank r's r + 1 causal blocks."""
    for rank, counts in enumerate(run_distributed(_blocks, 4)):
        assert counts["per_shard"] == 2, counts
        assert counts["one_doc"] == 2 * (rank + 1), counts


def test_segments_must_be_the_global_ids():
    q = torch.zeros(1, 8, 2, 4)
    with pytest.raises(ValueError, match=r"shape \(batch, seq_local \* cp\) = \(1, 8\)"):
        context_parallel_attention(q, q, q, segments=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="integer document ids"):
        context_parallel_attention(q, q, q, segments=torch.zeros(1, 8))
