"""Context-parallel recurrent layers (state passing, conv halo) against single-process results.

Oracle pattern: every rank builds the same global inputs, runs the single-process float64 kernel
on the full sequence, takes its contiguous shard, runs the CP version and compares its local
outputs and the gradients of its shard (and of the shared parameters, summed over ranks).
Tolerances: float64 <= 1e-10 (same math, other association order); float32 <= 1e-5 relative to
each tensor's largest entry (exact algorithms in float32 vs a float64 oracle; see
tests/kernels/test_linear_attention.py).
"""

from functools import partial

import ctxscale.dist.recurrent as recurrent_module
import pytest
import torch
import torch.distributed as dist
from ctxscale.dist import comm
from ctxscale.dist.recurrent import (
    cp_causal_conv1d,
    cp_linear_attention,
    cp_selective_scan,
    pass_states,
)
from ctxscale.kernels import causal_conv1d, linear_attention, selective_scan

from tests.harness import run_distributed

N = 44  # global length: 22 per rank at cp=2, 11 at cp=4
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def _compare(case, dtype, fn_full, fn_cp, inputs, seq_dims, rank, world, group=None):
    """Run fn_full on the global float64 inputs and fn_cp on this rank's shard in `dtype`;
    compare outputs and gradients. seq_dims[name] = sequence axis, or None for parameters."""
    sl = N // world
    gen = torch.Generator().manual_seed(7)
    full = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    out = fn_full(**full)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    seq_out = 2 if out.dim() == 3 else 1  # (b, d, L) or (b, L, h, d)
    (out * w).sum().backward()

    def shard(t, dim):
        return t if dim is None else t.narrow(dim, rank * sl, sl)

    local = {k: shard(v, seq_dims[k]).detach().to(dtype).requires_grad_() for k, v in inputs.items()}
    out_local = fn_cp(**local)
    (out_local * shard(w, seq_out).to(dtype)).sum().backward()
    errors = {"out": _rel(out_local, shard(out, seq_out))}
    for k in inputs:
        grad = local[k].grad
        if seq_dims[k] is None:  # shared parameter: sum the ranks' contributions
            grad = grad.double()
            dist.all_reduce(grad, group=group)
        errors["d" + k] = _rel(grad, shard(full[k].grad, seq_dims[k]))
    bad = {k: e for k, e in errors.items() if not e <= TOL[dtype]}
    assert not bad, f"{case} {dtype} world={world}: {bad}"
    return errors


def _la_inputs(decay, g, qk_heads=None):
    """qk_heads < h: grouped q/k (Mamba-2's B and C), each serving h / qk_heads heads."""
    b, h, dk, dv = 2, 6, 24, 7
    hk = qk_heads or h
    x = dict(q=torch.randn(b, N, hk, dk, generator=g, dtype=torch.float64),
             k=torch.randn(b, N, hk, dk, generator=g, dtype=torch.float64),
             v=torch.randn(b, N, h, dv, generator=g, dtype=torch.float64))
    dims = dict(q=1, k=1, v=1)
    if decay == "token":
        x["log_decay"], dims["log_decay"] = -torch.rand(b, N, h, generator=g, dtype=torch.float64), 1
    elif decay == "head":
        x["log_decay"], dims["log_decay"] = -torch.rand(h, generator=g, dtype=torch.float64) * 0.3, None
    return x, dims


def _ss_inputs(grouped, g):
    b, d, n = 2, 6, 5
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    bc = (b, 3, n, N) if grouped else (b, n, N)
    x = dict(u=r(b, d, N), delta=r(b, d, N) * 0.5, A=-torch.rand(d, n, generator=g, dtype=torch.float64) * 3,
             B=r(*bc), C=r(*bc))
    dims = dict(u=2, delta=2, A=None, B=len(bc) - 1, C=len(bc) - 1)
    if grouped:  # every optional term on
        x.update(D=r(d), z=r(b, d, N), delta_bias=r(d) * 0.3)
        dims.update(D=None, z=2, delta_bias=None)
    return x, dims


def _cases(rank, world):
    results = {}
    # several checkpointed pieces of the selective-scan correction even at these short shards
    previous, recurrent_module.CORRECTION_SEGMENT = recurrent_module.CORRECTION_SEGMENT, 4
    try:
        _run_cases(rank, world, results)
    finally:
        recurrent_module.CORRECTION_SEGMENT = previous
    return results


def _run_cases(rank, world, results):
    for dtype in (torch.float64, torch.float32):
        for method in ("ring", "allgather"):
            for decay in ("none", "token", "head"):
                x, dims = _la_inputs(decay, torch.Generator().manual_seed(1))
                results[("la", decay, method, str(dtype))] = _compare(
                    f"linear_attention[{decay},{method}]", dtype,
                    linear_attention, partial(cp_linear_attention, method=method),
                    x, dims, rank, world)
            for decay in ("none", "token"):  # grouped q/k: 2 heads of q/k for 6 of v
                x, dims = _la_inputs(decay, torch.Generator().manual_seed(4), qk_heads=2)
                results[("la-grouped", decay, method, str(dtype))] = _compare(
                    f"linear_attention[grouped,{decay},{method}]", dtype,
                    linear_attention, partial(cp_linear_attention, method=method),
                    x, dims, rank, world)
            for grouped in (False, True):
                x, dims = _ss_inputs(grouped, torch.Generator().manual_seed(2))
                results[("ss", grouped, method, str(dtype))] = _compare(
                    f"selective_scan[grouped={grouped},{method}]", dtype,
                    partial(selective_scan, delta_softplus=grouped),
                    partial(cp_selective_scan, delta_softplus=grouped, method=method),
                    x, dims, rank, world)
        g = torch.Generator().manual_seed(3)
        x = dict(x=torch.randn(2, 5, N, generator=g, dtype=torch.float64),
                 weight=torch.randn(5, 4, generator=g, dtype=torch.float64),
                 bias=torch.randn(5, generator=g, dtype=torch.float64))
        results[("conv", str(dtype))] = _compare(
            "causal_conv1d", dtype, lambda **a: causal_conv1d(a["x"], a["weight"], a["bias"], activation="silu"),
            lambda **a: cp_causal_conv1d(a["x"], a["weight"], a["bias"], activation="silu"),
            x, dict(x=2, weight=None, bias=None), rank, world)


@pytest.mark.parametrize("world", [2, 4])
def test_cp_recurrent_matches_single_process(world):
    results = run_distributed(_cases, world, timeout=300)
    assert all(len(r) == 2 * (2 * 7 + 1) for r in results)


def _subgroups(rank, world):
    """Two independent CP groups {0, 1} and {2, 3}: group ranks, not global ranks, address peers."""
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    group = groups[rank // 2]
    grank = dist.get_rank(group)
    for method in ("ring", "allgather"):
        x, dims = _la_inputs("token", torch.Generator().manual_seed(10 + rank // 2))
        _compare(f"linear_attention[subgroup,{method}]", torch.float64, linear_attention,
                 partial(cp_linear_attention, method=method, group=group), x, dims, grank, 2,
                 group)
        x, dims = _ss_inputs(True, torch.Generator().manual_seed(20 + rank // 2))
        _compare(f"selective_scan[subgroup,{method}]", torch.float64,
                 partial(selective_scan, delta_softplus=True),
                 partial(cp_selective_scan, delta_softplus=True, method=method, group=group),
                 x, dims, grank, 2, group)
    g = torch.Generator().manual_seed(30 + rank // 2)
    x = dict(x=torch.randn(2, 5, N, generator=g, dtype=torch.float64),
             weight=torch.randn(5, 3, generator=g, dtype=torch.float64))
    _compare("causal_conv1d[subgroup]", torch.float64,
             lambda **a: causal_conv1d(a["x"], a["weight"]),
             lambda **a: cp_causal_conv1d(a["x"], a["weight"], group=group),
             x, dict(x=2, weight=None), grank, 2, group)
    return True


def test_cp_recurrent_on_subgroups():
    assert all(run_distributed(_subgroups, 4))


def _ring_traffic(rank, world):
    """The ring sends one state forward and one gradient back per hop; the all-gather sends
    this rank's summary to every peer, in each direction."""
    b, h, dk, dv, sl = 1, 2, 3, 4, 5
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, sl, h, d, generator=g, requires_grad=True) for d in (dk, dk, dv))
    state_bytes = b * h * dk * dv * 4
    out = {}
    for method in ("ring", "allgather"):
        with comm.counting():
            cp_linear_attention(q, k, v, method=method).sum().backward()
            out[method] = comm.comm_stats()
    sends = (rank < world - 1) + (rank > 0)
    assert out["ring"]["p2p"]["bytes_sent"] == sends * state_bytes
    gathered = out["allgather"]["state_all_gather"]
    assert gathered["calls"] == 2  # forward summaries, backward adjoints
    assert gathered["bytes_sent"] == (world - 1) * (state_bytes + b * h * 4 + state_bytes)
    return True


def test_state_traffic_is_accounted():
    assert all(run_distributed(_ring_traffic, 4))


def _errors(rank, world):
    x = torch.randn(1, 2, 2)
    with pytest.raises(ValueError, match="method"):
        pass_states(torch.zeros(2), torch.zeros(1), method="tree")
    with pytest.raises(ValueError, match="conv width"):
        cp_causal_conv1d(x, torch.randn(2, 4))
    return True


def test_actionable_errors():
    assert all(run_distributed(_errors, 2))
