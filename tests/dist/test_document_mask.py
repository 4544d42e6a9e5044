"""Document masking under context parallelism: every method (ring in each layout, RSA, LightSeq,
Ulysses, USP) with the global document ids gives this rank's shard of single-process attention
with the same ids (float64 reference, outputs and dq/dk/dv), and ring skips the blocks between
shards that share no document. The recurrent layers' state passing and conv halo restart at
document starts across ranks too.

Tolerance: float32 against float64, normwise, 1e-5 (derived in tests/dist/test_ring.py; masking
only removes terms).
"""

from __future__ import annotations

from functools import partial

import pytest
import torch
from ctxscale.dist import comm, context_parallel_attention, shard_sequence
from ctxscale.dist.recurrent import cp_causal_conv1d, cp_linear_attention, cp_selective_scan
from ctxscale.kernels import causal_conv1d, linear_attention, selective_scan
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


# ---------------------------------------------------------------- recurrent layers
# N = 44 (tests/dist/test_recurrent.N): row 0 has documents starting at both shard boundaries of
# cp=2 (22) and cp=4 (11, 22) and a 1-token one; row 1 a 2-token document (shorter than the
# conv's state) right after the cp=4 boundary at 11 and one spanning every later shard
RECURRENT_SEGMENTS = packed_segments([[5, 6, 1, 10, 16, 6], [13, 2, 29]], 44)


def _recurrent_sweep(rank, world):
    from tests.dist.test_recurrent import N, _compare, _la_inputs, _ss_inputs

    assert RECURRENT_SEGMENTS.shape[1] == N
    seg = RECURRENT_SEGMENTS
    errors = {}
    for method in ("ring", "allgather"):
        for decay, qk_heads in (("none", None), ("token", None), ("head", None), ("token", 2)):
            x, dims = _la_inputs(decay, torch.Generator().manual_seed(1), qk_heads=qk_heads)
            errors[("la", decay, qk_heads, method)] = _compare(
                f"linear_attention[{decay},{qk_heads},{method}]", torch.float32,
                partial(linear_attention, segments=seg),
                partial(cp_linear_attention, method=method, segments=seg), x, dims, rank, world)
        for grouped in (False, True):
            x, dims = _ss_inputs(grouped, torch.Generator().manual_seed(2))
            errors[("ss", grouped, method)] = _compare(
                f"selective_scan[grouped={grouped},{method}]", torch.float32,
                partial(selective_scan, delta_softplus=grouped, segments=seg),
                partial(cp_selective_scan, delta_softplus=grouped, method=method, segments=seg),
                x, dims, rank, world)
    g = torch.Generator().manual_seed(3)
    x = dict(x=torch.randn(2, 5, N, generator=g, dtype=torch.float64),
             weight=torch.randn(5, 4, generator=g, dtype=torch.float64),
             bias=torch.randn(5, generator=g, dtype=torch.float64))
    errors["conv"] = _compare(
        "causal_conv1d", torch.float32,
        lambda **a: causal_conv1d(a["x"], a["weight"], a["bias"], activation="silu", segments=seg),
        lambda **a: cp_causal_conv1d(a["x"], a["weight"], a["bias"], activation="silu",
                                     segments=seg),
        x, dict(x=2, weight=None, bias=None), rank, world)
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_recurrent_state_passing_restarts_at_documents(world):
    """Linear attention (every decay kind, grouped q/k), the selective scan and the conv halo
    with the global document ids: this rank's shard of the single-process result with the same
    ids, outputs and every gradient (`_compare` asserts float32 <= 1e-5 of float64)."""
    per_rank = run_distributed(_recurrent_sweep, world, timeout=300)
    assert all(len(r) == 2 * 6 + 1 for r in per_rank)


def _local_ids_refused(rank, world):
    q = torch.zeros(1, 4, 2, 3)
    with pytest.raises(ValueError, match=r"global document ids.*\(batch, seq\) = \(1, 8\)"):
        cp_linear_attention(q, q, q, segments=torch.zeros(1, 4, dtype=torch.long))
    return True


def test_recurrent_cp_refuses_local_document_ids():
    assert all(run_distributed(_local_ids_refused, 2))
