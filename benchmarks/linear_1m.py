"""Train a small linear-attention model on 1,048,576-token sequences with context parallelism
(cp = 2, two gloo processes on this CPU machine) and record tokens/s and peak memory.

The model is `configs/linear_tiny.yaml` (LAWCAT layers: causal conv on q/k + gated normalized
linear attention; state passing between the two sequence halves) with full activation
checkpointing; data is the embedded MQAR task at seq_len 2^20, batch 1, `--steps` optimizer
steps through the normal `ctxscale.launch.train` entry point under torchrun. Tokens/s come from
the run's `metrics.jsonl`; memory is the peak resident set of the largest rank (from
getrusage of the finished children) and that times two as the total. Writes
`benchmarks/results/linear_1m_cpu.md`.

    python benchmarks/linear_1m.py [--steps 2] [--seq-len 1048576] [--dim 64]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]




def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1048576)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--kind", default="lawcat")
    p.add_argument("--cp", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/linear_1m_cpu.md")
    a = p.parse_args()
    out_dir = Path(tempfile.mkdtemp(prefix="linear_1m_"))
    overrides = [
        f"model.dim={a.dim}", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        f"model.linear_attention.kind={a.kind}", f"model.max_seq_len={a.seq_len}",
        "model.activation_checkpointing=full", f"data.seq_len={a.seq_len}",
        "train.batch_size=1", f"train.steps={a.steps}", "train.eval_every=0",
        "train.eval_batches=0", "train.progress=false", "train.tensorboard=false",
        "optim.warmup_steps=1", "checkpoint.at_end=false", "checkpoint.every=0",
        "checkpoint.resume=none", f"parallel.cp={a.cp}", "parallel.cp_layout=contiguous",
        "parallel.dp_engine=ddp", f"train.output_dir={out_dir}",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={a.cp}", "-m", "ctxscale.launch.train",
           "--config", str(ROOT / "configs" / "linear_tiny.yaml"), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    recs = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    lines = [
        "# Linear-attention model at 1,048,576 tokens per sequence, context parallel on CPU",
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores shared with other jobs; {a.cp} gloo "
        "processes, 1 thread each.",
        f"Model: linear family, kind {a.kind}, dim {a.dim}, 2 layers, 4 heads (2 kv), full "
        f"activation checkpointing, float32; MQAR data, batch 1, seq_len {a.seq_len} "
        f"({a.seq_len // a.cp} tokens per rank), cp={a.cp} contiguous (state passing).",
        "",
        f"Command: `python benchmarks/linear_1m.py --steps {a.steps} --seq-len {a.seq_len} "
        f"--dim {a.dim} --kind {a.kind} --cp {a.cp}`",
        "",
        "| step | loss | step time s | tokens/s |",
        "|---:|---:|---:|---:|",
    ]
    lines += [f"| {r['step']} | {r['loss']:.4f} | {r['step_time_s']:.1f} | {r['tokens_per_s']:.0f} |"
              for r in steps]
    lines += [
        "",
        f"Peak resident memory: {rss / 2**30:.2f} GiB on the largest rank, "
        f"<= {2 * rss / 2**30:.2f} GiB for both ranks; wall time of the whole job "
        f"(start-up included) {wall:.0f} s.",
    ]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
