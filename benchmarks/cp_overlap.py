"""Does ring attention hide its communication? Step time with overlap vs a synchronous schedule
under an injected per-hop delay (`ctxscale.dist.comm.set_p2p_delay`).

Ring attention (dist/ring.py) posts the hop that brings the next step's K/V before computing the
current block and waits on it after, so with block compute time c and per-hop delay d a ring step
takes max(c, d); the synchronous schedule (`overlap=False`: post, wait, compute) pays c + d.

The script times each block's compute inside every run (it wraps the kernels that
`ctxscale.dist.ring` calls), so the predictions use the compute times of that very run and stay
meaningful on a busy machine. With c_t the compute of step t and P ranks:

    forward   overlap  sum_{t<P-1} max(c_t, d) + c_{P-1}        sync  sum_t c_t + (P-1)·d
    backward  overlap  sum_{t<P-1} max(c_t, d) + max(c_{P-1}, d if P>2 else 0) + d
              sync     sum_t c_t + 2(P-1)·d         (K/V ring ahead of, dK/dV ring behind compute;
                                                     the final dK/dV hop is exposed in both)

and the table prints measured/predicted for both schedules ("max" model for overlap, "sum" model
for sync) next to the speedup sync/overlap. Delays are multiples of the median block compute.

    python benchmarks/cp_overlap.py                  # P=2 gloo processes on CPU
    python benchmarks/cp_overlap.py --world 4 --seq 2048

Non-causal attention so every ring step has the same block; one thread per process.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script


def _machine() -> str:
    model = cpu_name()
    load = f", load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{model}, {os.cpu_count()} logical cores{load}, torch {torch.__version__}"


def _predict(phase, overlap, c, d):
    """Step-time model of dist/ring.py's schedule from this run's block compute times `c`."""
    P = len(c)
    if not overlap:
        return sum(c) + (P - 1) * d * (1 if phase == "fwd" else 2)
    hidden = sum(max(ct, d) for ct in c[:-1])
    if phase == "fwd":
        return hidden + c[-1]
    return hidden + (max(c[-1], d) if P > 2 else c[-1]) + (d if P > 1 else 0.0)


def _worker(rank, world, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from ctxscale.dist import comm, ring

    block_times = []

    def timed(fn):
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            block_times.append(time.perf_counter() - t0)
            return out
        return wrapper

    ring.attention_forward = timed(ring.attention_forward)
    ring.attention_backward = timed(ring.attention_backward)

    n = args.seq // world
    g = torch.Generator().manual_seed(rank)
    q = torch.randn(1, n, args.heads, args.dim, generator=g)
    k = torch.randn(1, n, args.kv_heads, args.dim, generator=g)
    v = torch.randn(1, n, args.kv_heads, args.dim, generator=g)
    do = torch.randn_like(q)

    def run(overlap, delay, backward=True):
        """One forward (and backward); returns {phase: (seconds, block compute times)}."""
        qq, kk, vv = (x.clone().requires_grad_(backward) for x in (q, k, v))
        comm.set_p2p_delay(delay)
        dist.barrier()
        block_times.clear()
        t0 = time.perf_counter()
        out = ring.ring_attention(qq, kk, vv, causal=False, overlap=overlap)
        t_fwd = time.perf_counter() - t0
        c_fwd = list(block_times)
        if not backward:
            comm.set_p2p_delay(0.0)
            return {"fwd": (t_fwd, c_fwd)}
        dist.barrier()
        block_times.clear()
        t0 = time.perf_counter()
        out.backward(do)
        t_bwd = time.perf_counter() - t0
        comm.set_p2p_delay(0.0)
        return {"fwd": (t_fwd, c_fwd), "bwd": (t_bwd, list(block_times))}

    run(True, 0.0)  # warm up
    base = [run(True, 0.0) for _ in range(args.repeats)]
    med = torch.tensor([statistics.median(x for r in base for x in r[ph][1])
                        for ph in ("fwd", "bwd")], dtype=torch.float64)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)  # one delay for all ranks
    c_med = {"fwd": med[0].item(), "bwd": med[1].item()}
    rows = []
    for factor in args.delays:
        for phase in ("fwd", "bwd"):
            d = factor * c_med[phase]
            for overlap in (True, False):
                runs = [run(overlap, d, phase == "bwd")[phase] for _ in range(args.repeats)]
                t = statistics.median(x[0] for x in runs)
                pred = statistics.median(_predict(phase, overlap, x[1], d) for x in runs)
                c_sum = statistics.median(sum(x[1]) for x in runs)
                rows.append(dict(factor=factor, phase=phase, overlap=overlap, d=d, t=t,
                                 pred=pred, c_sum=c_sum))
    results.put((rank, dict(c=c_med, rows=rows)))
    dist.barrier()
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024, help="global sequence length")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--delays", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="per-hop delay as a multiple of the block compute time")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, args.world, port, args, results))
             for r in range(args.world)]
    for p in procs:
        p.start()
    per_rank = dict(results.get() for _ in procs)
    for p in procs:
        p.join()

    print(f"machine: {_machine()}")
    print(f"ring attention, P={args.world} gloo processes (1 thread each), global seq {args.seq}, "
          f"heads {args.heads}/{args.kv_heads}, head_dim {args.dim}, non-causal; medians of "
          f"{args.repeats} runs; each row is the slowest rank")
    c = per_rank[0]["c"]
    print(f"median block compute (slowest rank): forward {c['fwd'] * 1e3:.1f} ms, "
          f"backward {c['bwd'] * 1e3:.1f} ms")
    print(f"{'pass':>4} {'d/c':>4} {'d ms':>7} {'compute ms':>10} {'overlap ms':>10} "
          f"{'ov/max-model':>12} {'sync ms':>8} {'sync/sum-model':>14} {'sync/overlap':>12}")
    rows = per_rank[0]["rows"]
    for i in range(0, len(rows), 2):
        ov = max((r["rows"][i] for r in per_rank.values()), key=lambda x: x["t"])
        sy = max((r["rows"][i + 1] for r in per_rank.values()), key=lambda x: x["t"])
        print(f"{ov['phase']:>4} {ov['factor']:>4.1f} {ov['d'] * 1e3:>7.1f} "
              f"{ov['c_sum'] * 1e3:>10.1f} {ov['t'] * 1e3:>10.1f} {ov['t'] / ov['pred']:>12.2f} "
              f"{sy['t'] * 1e3:>8.1f} {sy['t'] / sy['pred']:>14.2f} {sy['t'] / ov['t']:>12.2f}")
    print("ov/max-model ~ 1: overlapped steps cost max(compute, delay); sync/sum-model ~ 1: "
          "synchronous steps cost compute + delay (models in the module docstring)")


if __name__ == "__main__":
    main()
