"""`ctxscale sweep`: a context-length scaling experiment, read back as a table and a plot.

    ctxscale sweep --config configs/tiny.yaml --seq-lens 128,256,512 --nproc 2 train.steps=100

runs one training job per sequence length (each in its own folder `<out>/seq_<N>`, under
torchrun when `--nproc > 1`), then collects every run's `metrics.jsonl` into
`<out>/sweep.md`, `<out>/sweep.csv` and, when matplotlib is installed, `<out>/sweep.png`
(final eval accuracy / loss and tokens/s against context length; the table also has the
median model TFLOP/s per device and, on a GPU of known peak, MFU). `--collect-only` rebuilds the
table from finished runs (for example after `sbatch slurm/sweep.sbatch`).
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

COLUMNS = ["seq_len", "steps", "final_loss", "eval_loss", "eval_accuracy", "tokens_per_s",
           "tflops", "mfu", "peak_memory_mib"]


def summarize_run(run_dir: Path) -> dict | None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    steps = [r for r in records if r.get("loss") is not None]
    evals = [r for r in records if r.get("eval_loss") is not None]
    if not steps:
        return None
    late = steps[len(steps) // 4:] or steps  # past the warm-up steps

    def median(key):
        values = sorted(r[key] for r in late if r.get(key) is not None)
        return values[len(values) // 2] if values else None

    return {
        "seq_len": int(run_dir.name.split("_", 1)[1]),
        "steps": steps[-1]["step"],
        "final_loss": steps[-1]["loss"],
        "eval_loss": evals[-1]["eval_loss"] if evals else None,
        "eval_accuracy": evals[-1].get("eval_accuracy") if evals else None,
        "tokens_per_s": median("tokens_per_s"),
        "tflops": median("tflops"),  # model TFLOP/s per device (runs before it: None)
        "mfu": median("mfu"),  # % of the device's peak, where known
        "peak_memory_mib": max(r.get("memory_bytes", 0) for r in steps) / 2**20,
    }


def collect(out_dir: str | Path) -> list[dict]:
    """Write sweep.md / sweep.csv (and sweep.png with matplotlib); returns the rows."""
    out = Path(out_dir)
    rows = [s for d in sorted(out.glob("seq_*")) if (s := summarize_run(d))]
    rows.sort(key=lambda r: r["seq_len"])
    if not rows:
        raise ValueError(f"no finished runs (seq_*/metrics.jsonl) under {out}")
    with (out / "sweep.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    def fmt(v):
        return "—" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in COLUMNS) + " |" for r in rows]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("sweep: matplotlib not installed; wrote the table only", file=sys.stderr)
        return rows
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [r["seq_len"] for r in rows]
    if any(r["eval_accuracy"] is not None for r in rows):
        ax1.plot(xs, [r["eval_accuracy"] for r in rows], marker="o")
        ax1.set_ylabel("eval accuracy")
    else:
        ax1.plot(xs, [r["eval_loss"] for r in rows], marker="o")
        ax1.set_ylabel("eval loss")
    ax2.plot(xs, [r["tokens_per_s"] for r in rows], marker="o")
    ax2.set_ylabel("tokens / s")
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "sweep.png", dpi=120)
    plt.close(fig)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ctxscale sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", "-c", required=True)
    p.add_argument("--seq-lens", required=True, help="comma-separated, e.g. 128,256,512")
    p.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun)")
    p.add_argument("--out", default="runs/sweep")
    p.add_argument("--collect-only", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    try:
        seq_lens = [int(x) for x in args.seq_lens.split(",") if x.strip()]
    except ValueError:
        print(f"ctxscale sweep: --seq-lens must be integers, got {args.seq_lens!r}", file=sys.stderr)
        return 2
    out = Path(args.out)
    # the sweep sets these per run; an override of them would be silently replaced
    owned = {"data.seq_len": "--seq-lens", "train.output_dir": "--out"}
    for o in args.overrides:
        if o.split("=", 1)[0] in owned:
            key = o.split("=", 1)[0]
            print(f"ctxscale sweep: {o!r}: the sweep sets {key} for each run; use "
                  f"{owned[key]} instead", file=sys.stderr)
            return 2
    if not args.collect_only:
        from ctxscale.launch.config import ConfigError, load_job_config

        for n in seq_lens:  # validate every run before starting any
            try:
                load_job_config(args.config, [*args.overrides, f"data.seq_len={n}"])
            except ConfigError as e:
                print(f"ctxscale sweep: seq_len={n}: {e}", file=sys.stderr)
                return 2
        for n in seq_lens:
            launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={args.nproc}"] if args.nproc > 1 else [sys.executable]
            cmd = [*launcher, "-m", "ctxscale.launch.train", "--config", args.config,
                   *args.overrides, f"data.seq_len={n}", f"train.output_dir={out}/seq_{n}",
                   "train.progress=false"]
            print(f"sweep: seq_len={n}", flush=True)
            if subprocess.run(cmd).returncode != 0:
                print(f"ctxscale sweep: the run at seq_len={n} failed", file=sys.stderr)
                return 1
    rows = collect(out)
    print((out / "sweep.md").read_text())
    print(f"sweep: {len(rows)} runs -> {out}/sweep.md, sweep.csv" +
          (", sweep.png" if (out / "sweep.png").exists() else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
