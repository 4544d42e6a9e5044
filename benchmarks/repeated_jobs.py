"""Many training jobs in one long-lived process group (a notebook, an in-process sweep, the test
pool): threads, process groups and job time as the jobs pile up, with the device mesh reused
(`ParallelDims.build_mesh`, now) against a fresh mesh per job (before: every job's gloo groups
stayed alive).

    python benchmarks/repeated_jobs.py                     # 4 ranks, 24 jobs; writes the results
    python benchmarks/repeated_jobs.py --jobs 4 --no-write

Each mode runs in its own 4-process gloo group (the leak would otherwise carry over). "fresh"
empties the mesh cache before each job, which is exactly the old behaviour: a new mesh whose
groups nobody destroys. Every job is the same tiny tp=2 x dp=2 run (2 layers, 3 steps).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch.multiprocessing as mp
from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "repeated_jobs_cpu.md"
JOB = [
    "model.dim=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "data.seq_len=48", "data.vocab_size=64", "data.num_kv_pairs=4", "train.batch_size=2",
    "train.progress=false", "train.tensorboard=false", "train.eval_every=0",
    "train.eval_batches=1", "train.steps=3", "checkpoint.every=0", "checkpoint.at_end=false",
    "checkpoint.resume=none", "parallel.tp=2",
]


def _rank(rank, world, port, mode, jobs, out, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _world

    from ctxscale.dist import mesh as mesh_mod
    from ctxscale.launch.config import load_job_config
    from ctxscale.launch.train import train

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rows = []
    for j in range(jobs):
        if mode == "fresh":
            mesh_mod._MESHES.clear()  # the old behaviour: a new mesh, the old one's groups kept
        dist.barrier()
        t0 = time.perf_counter()
        train(load_job_config(ROOT / "configs" / "tiny.yaml",
                              JOB + [f"train.output_dir={out}/{mode}/{j}"]))
        dist.barrier()
        rows.append((time.perf_counter() - t0, len(os.listdir(f"/proc/{os.getpid()}/task")),
                     len(_world.pg_map)))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def run_mode(mode: str, world: int, jobs: int, out: str) -> list:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_rank, args=(r, world, port, mode, jobs, out, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=1800)
    for p in procs:
        p.join(timeout=60)
    return rows


def markdown(results: dict, world: int, jobs: int, command: str) -> str:
    reuse, fresh = results["reuse"], results["fresh"]
    last = max(1, jobs // 4)  # the last quarter of the jobs
    t_reuse = statistics.median(r[0] for r in reuse[-last:])
    t_fresh = statistics.median(r[0] for r in fresh[-last:])
    lines = [
        f"# {jobs} training jobs in one {world}-rank gloo process group ({cpu_name()})",
        "",
        f"`{command}`. Each job: tiny Transformer, tp=2 x dp=2, 3 steps. \"reuse\": the mesh",
        "cache of `ParallelDims.build_mesh` (now); \"fresh\": a new mesh per job whose groups stay",
        "alive (before). Threads and process groups of rank 0's process after each job.",
        "",
        "| job | reuse: s | reuse: threads | reuse: groups | fresh: s | fresh: threads | fresh: groups |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for j in sorted({0, 1, jobs // 4, jobs // 2, 3 * jobs // 4, jobs - 1}):
        a, b = reuse[j], fresh[j]
        lines.append(f"| {j + 1} | {a[0]:.2f} | {a[1]} | {a[2]} | {b[0]:.2f} | {b[1]} | {b[2]} |")
    lines += ["", f"Median job time over the last {last} jobs: reuse {t_reuse:.2f} s, fresh "
              f"{t_fresh:.2f} s (fresh / reuse = {t_fresh / t_reuse:.2f}x).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--jobs", type=int, default=24)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    command = "python benchmarks/repeated_jobs.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    with tempfile.TemporaryDirectory() as out:
        results = {mode: run_mode(mode, args.world, args.jobs, out) for mode in ("reuse", "fresh")}
    text = markdown(results, args.world, args.jobs, command)
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
