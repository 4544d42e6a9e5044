"""Context-parallel attention on CPU processes: time, bytes and memory per method and P.

    python benchmarks/cp_attention.py                       # defaults: P = 2 and 4, N = 2048, 4096
    python benchmarks/cp_attention.py --worlds 2 --seq-lens 4096 --repeats 5

For every world size P it spawns P processes (torch.multiprocessing, gloo, one thread each) and
runs, at each sequence length N, causal forward + backward of every method on the same global
inputs (batch 1, 4 heads, head_dim 64, float32):
  rsa, ring-contiguous, ring-zigzag, ring-stripe (from `dist/rsa.py`, `dist/ring.py`; skipped
  when those modules are missing), lightseq, ulysses, usp (Ulysses degree 2 x ring, zigzag; P >= 4
  only, since at P = 2 it is Ulysses or ring), and DeepSpeed-Ulysses'
  `deepspeed.sequence.layer.DistributedAttention` around the same local attention as `ulysses`
  (our dispatcher, which picks SDPA on CPU). Ring, RSA and LightSeq compute their blocks with the
  blockwise PyTorch kernel (`attention_forward/backward`), so two single-process baselines on the
  full sequence run too, in the parent process with one thread: `single` (dispatcher: SDPA) and
  `single-blockwise` (the kernel ring and LightSeq use).

Columns: time = median wall time of forward + backward over `--repeats` runs (the slowest rank
of each run); bytes/rank = max over ranks of the bytes sent by `ctxscale.dist.comm` in one
forward + backward (DeepSpeed's own all-to-alls bypass it, so its row gives the closed-form
Ulysses volume 2 · (P−1)/P · (|q|+|k|+|v|+|o|), marked *); peak mem/rank = max over ranks of the
peak resident-set growth during one forward + backward (VmHWM after resetting it through
/proc/self/clear_refs, minus VmRSS before; glibc's mmap threshold is pinned to 64 KiB so freed
tensors go back to the OS and every run starts from a clean high-water mark), and its ratio to
single-process peak / P.

Ratios reported: lightseq and ring-zigzag time vs ring-contiguous at P = 2 (the causal load
imbalance of the contiguous ring is what they remove), and peak memory per rank vs single / P.
An overlap table runs LightSeq and ring-zigzag with an injected per-hop delay
(`comm.set_p2p_delay`) with and without overlap.

Results go to benchmarks/results/cp_attention_cpu.md and .csv, with the machine (CPU model and
core count, load average) in the header. On a shared or oversubscribed machine (P > cores)
timings are noisy: compare ratios within one run only.
"""

from __future__ import annotations

import argparse
import csv
import os
import queue as queue_mod
import socket
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # inherited by the spawned workers
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script

HEADS, HEAD_DIM, BATCH = 4, 64, 1
RESULTS = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------- measurement helpers
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False




def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs(seq_len, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(BATCH, seq_len, HEADS, HEAD_DIM, generator=g, dtype=dtype)
            for _ in range(4)]  # q, k, v, do


# ---------------------------------------------------------------- methods
def _methods(world):
    """name -> (layout, fn(q, k, v) -> o) for the methods importable here."""
    from ctxscale.dist.lightseq import lightseq_attention
    from ctxscale.dist.ulysses import ulysses_attention
    from ctxscale.dist.usp import usp_attention

    methods = {}
    try:
        from ctxscale.dist.rsa import ring_self_attention

        methods["rsa"] = ("contiguous", lambda q, k, v: ring_self_attention(q, k, v, causal=True))
    except ImportError:
        pass
    try:
        from ctxscale.dist.ring import ring_attention

        for layout in ("contiguous", "zigzag", "stripe"):
            methods[f"ring-{layout}"] = (
                layout, lambda q, k, v, lay=layout: ring_attention(q, k, v, layout=lay, causal=True))
    except ImportError:
        pass
    methods["lightseq"] = ("contiguous", lambda q, k, v: lightseq_attention(q, k, v, causal=True))
    methods["ulysses"] = ("contiguous", lambda q, k, v: ulysses_attention(q, k, v, causal=True))
    if world >= 4:
        methods["usp"] = ("zigzag", lambda q, k, v: usp_attention(q, k, v, layout="zigzag",
                                                                  causal=True, ulysses_degree=2))
    try:
        import importlib

        import deepspeed
        from deepspeed.sequence.layer import DistributedAttention

        ds_torch = importlib.import_module("deepspeed.comm.torch")  # the module, not torch
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op at init (minutes,
        # and a C++ toolchain); the all-to-alls measured here do not use it.
        ds_torch.build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)  # wraps ours

        from ctxscale.kernels import attention

        ds = DistributedAttention(lambda q, k, v: attention(q, k, v, causal=True),
                                  dist.group.WORLD, scatter_idx=2, gather_idx=1)
        methods["deepspeed-ulysses"] = ("contiguous", lambda q, k, v: ds(q, k, v, 0))
    except Exception as err:  # noqa: BLE001 - a missing or incompatible peer is reported, not fatal
        print(f"deepspeed-ulysses unavailable: {err}", file=sys.stderr)
    return methods


def _run_once(fn, q, k, v, do):
    from ctxscale.dist import comm

    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    dist.barrier()
    before = _rss_kib("VmRSS")
    _reset_peak()
    comm.reset_comm_stats()
    start = time.perf_counter()
    fn(q, k, v).backward(do)
    elapsed = time.perf_counter() - start
    peak = _rss_kib("VmHWM") - before
    stats = comm.comm_stats()
    sent = sum(s.get("bytes_sent", 0) for s in stats.values())
    work = sum(s.get("flops", 0.0) for s in stats.values())  # attention forward + backward
    return elapsed, sent, peak, work


def _worker(rank, world, port, seq_lens, repeats, delay, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from ctxscale.dist import comm, shard_sequence

    comm.enable_comm_stats(True)
    rows = []
    for seq_len in seq_lens:
        q, k, v, do = _inputs(seq_len)
        for name, (layout, fn) in _methods(world).items():
            local = [shard_sequence(t, layout=layout).contiguous() for t in (q, k, v, do)]
            _run_once(fn, *local)  # warm-up
            runs = [_run_once(fn, *local) for _ in range(repeats)]
            times = torch.tensor([r[0] for r in runs], dtype=torch.float64)
            dist.all_reduce(times, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
            bytes_peak = torch.tensor([max(r[1] for r in runs), max(r[2] for r in runs)],
                                      dtype=torch.float64)
            dist.all_reduce(bytes_peak, op=dist.ReduceOp.MAX)
            work = torch.tensor([runs[0][3]], dtype=torch.float64)
            work_max, work_sum = work.clone(), work.clone()
            dist.all_reduce(work_max, op=dist.ReduceOp.MAX)
            dist.all_reduce(work_sum)
            rows.append(dict(method=name, P=world, N=seq_len,
                             time_s=statistics.median(times.tolist()),
                             bytes_per_rank=int(bytes_peak[0]), peak_kib=int(bytes_peak[1]),
                             work_max=float(work_max), work_mean=float(work_sum) / world))
        # overlap: injected per-hop delay, with and without overlap
        if delay > 0:
            from ctxscale.dist.lightseq import lightseq_attention

            variants = {"lightseq": lambda o: (lambda a, b, c: lightseq_attention(
                a, b, c, causal=True, overlap=o))}
            try:
                from ctxscale.dist.ring import ring_attention

                variants["ring-zigzag"] = lambda o: (lambda a, b, c: ring_attention(
                    a, b, c, layout="zigzag", causal=True, overlap=o))
            except ImportError:
                pass
            comm.set_p2p_delay(delay)
            for name, make in variants.items():
                layout = "zigzag" if name == "ring-zigzag" else "contiguous"
                local = [shard_sequence(t, layout=layout).contiguous() for t in (q, k, v, do)]
                for overlap in (True, False):
                    runs = [_run_once(make(overlap), *local)[0] for _ in range(repeats)]
                    times = torch.tensor(runs, dtype=torch.float64)
                    dist.all_reduce(times, op=dist.ReduceOp.MAX)
                    rows.append(dict(method=f"{name} {'overlap' if overlap else 'sync'} "
                                            f"(delay {delay * 1e3:.0f} ms/hop)",
                                     P=world, N=seq_len, time_s=statistics.median(times.tolist()),
                                     bytes_per_rank=-1, peak_kib=-1))
            comm.set_p2p_delay(0.0)
    if rank == 0:
        queue.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def _single(seq_len, repeats):
    """Single-process baselines on the full sequence (this process, one thread)."""
    from ctxscale.kernels import attention, attention_blockwise

    torch.set_num_threads(1)
    q, k, v, do = _inputs(seq_len)
    fns = {"single": lambda a, b, c: attention(a, b, c, causal=True),
           "single-blockwise": lambda a, b, c: attention_blockwise(a, b, c, causal=True)[0]}
    rows = []
    for name, fn in fns.items():
        res = []
        for i in range(repeats + 1):
            a, b, c = (t.clone().requires_grad_() for t in (q, k, v))
            before = _rss_kib("VmRSS")
            _reset_peak()
            start = time.perf_counter()
            fn(a, b, c).backward(do)
            if i:  # the first run is a warm-up
                res.append((time.perf_counter() - start, _rss_kib("VmHWM") - before))
        rows.append(dict(method=name, P=1, N=seq_len, time_s=statistics.median(r[0] for r in res),
                         bytes_per_rank=0, peak_kib=max(r[1] for r in res)))
    return rows


# ---------------------------------------------------------------- report
def _fmt_bytes(n):
    return "-" if n < 0 else f"{n / 2**20:.2f} MiB"


def _opt(row, key, suffix=""):
    return "" if row.get(key) is None else f"{row[key]:.2f}{suffix}"


def _report(rows, args, header):
    RESULTS.mkdir(parents=True, exist_ok=True)
    single = {(r["N"], r["method"]): r for r in rows if r["P"] == 1}
    by_key = {(r["P"], r["N"], r["method"]): r for r in rows}
    for r in rows:
        base = single[(r["N"], "single-blockwise")]
        if r["P"] > 1 and r["peak_kib"] >= 0:
            r["mem_vs_single_over_P"] = r["peak_kib"] / max(base["peak_kib"] / r["P"], 1)
        ring = by_key.get((r["P"], r["N"], "ring-contiguous"))
        if ring and r["P"] > 1 and r["bytes_per_rank"] >= 0:
            r["speedup_vs_ring_contiguous"] = ring["time_s"] / r["time_s"]
        if r.get("work_max"):
            r["work_max_over_mean"] = r["work_max"] / r["work_mean"]
            if ring and ring.get("work_max"):
                r["critical_path_vs_ring_contiguous"] = ring["work_max"] / r["work_max"]
        if r["method"] == "deepspeed-ulysses":
            local = BATCH * (r["N"] // r["P"]) * HEADS * HEAD_DIM * 4
            r["bytes_per_rank"] = 2 * (r["P"] - 1) * 4 * local // r["P"]
            r["method"] += " *"
    fields = ["method", "P", "N", "time_s", "speedup_vs_ring_contiguous", "work_max_over_mean",
              "critical_path_vs_ring_contiguous", "bytes_per_rank", "peak_kib",
              "mem_vs_single_over_P"]
    with open(RESULTS / "cp_attention_cpu.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k, ""))
                        for k in fields})
    lines = [header, "",
             "| method | P | N | fwd+bwd time (s) | speedup vs ring-contiguous | attention work "
             "max/mean | critical-path work: ring-contiguous / method | bytes sent/rank "
             "| peak mem/rank | peak mem / (single-blockwise/P) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        sp = r.get("speedup_vs_ring_contiguous")
        mem = r.get("mem_vs_single_over_P")
        peak = "-" if r["peak_kib"] < 0 else f"{r['peak_kib'] / 1024:.1f} MiB"
        lines.append(
            f"| {r['method']} | {r['P']} | {r['N']} | {r['time_s']:.3f} | "
            f"{'' if sp is None else f'{sp:.2f}x'} | {_opt(r, 'work_max_over_mean')} | "
            f"{_opt(r, 'critical_path_vs_ring_contiguous', 'x')} | "
            f"{_fmt_bytes(r['bytes_per_rank'])} | "
            f"{peak} | "
            f"{'' if mem is None else f'{mem:.2f}'} |")
    lines += ["", "Key ratios (same run):", ""]
    for n in args.seq_lens:
        ring = by_key.get((2, n, "ring-contiguous"))
        for m in ("lightseq", "ring-zigzag"):
            r = by_key.get((2, n, m))
            if ring and r:
                lines.append(
                    f"- P=2, N={n}: {m} is {ring['time_s'] / r['time_s']:.2f}x the speed of "
                    "ring-contiguous (target >= 1.3x); its slowest rank does "
                    f"{ring['work_max'] / r['work_max']:.2f}x less attention work (the speedup "
                    "a compute-bound run with one core per process would show)")
    lines.append("\n* DeepSpeed's all-to-alls bypass ctxscale.dist.comm: closed-form Ulysses bytes.")
    (RESULTS / "cp_attention_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--delay-ms", type=float, default=50.0,
                        help="injected per-hop delay for the overlap table (0: skip it)")
    args = parser.parse_args()
    started = time.time()
    rows = []
    for n in args.seq_lens:
        rows += _single(n, args.repeats)
    ctx = mp.get_context("spawn")
    for world in args.worlds:
        queue = ctx.Queue()
        procs = mp.start_processes(_worker, args=(world, _free_port(), args.seq_lens, args.repeats,
                                          args.delay_ms / 1e3, queue),
                           nprocs=world, start_method="spawn", join=False)
        while True:  # a failed worker raises here (with its traceback) instead of hanging
            try:
                rows += queue.get(timeout=1.0)
                break
            except queue_mod.Empty:
                procs.join(timeout=0)
        while not procs.join():
            pass
    header = (
        f"# Context-parallel attention on CPU (gloo)\n\nMachine: {cpu_name()}, "
        f"{os.cpu_count()} cores, load average at start {os.getloadavg()[0]:.1f}; torch "
        f"{torch.__version__}; batch {BATCH}, {HEADS} heads, head_dim {HEAD_DIM}, float32, causal, "
        f"one thread per process; median of {args.repeats} runs; total run "
        f"{time.time() - started:.0f} s. Peak memory = peak RSS growth during one forward + "
        "backward (VmHWM reset via /proc/self/clear_refs)."
    )
    _report(rows, args, header)


if __name__ == "__main__":
    main()
