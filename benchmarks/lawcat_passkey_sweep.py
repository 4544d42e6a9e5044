"""LAWCAT students of one teacher: passkey retrieval beyond the distillation length L, by variant
and seed (the spread between seeds is part of the result).

Needs the teacher of `benchmarks/conversion.py` (its `<work>/teacher_summary.json`); every variant
is converted with the same recipe as there (attention transfer, then full fine-tuning, at L) and
evaluated on held-out perplexity and passkey accuracy at L, 2L, ..., 16L.

    python benchmarks/lawcat_passkey_sweep.py --seeds 0,1,2 --jobs 2 \
        --variant "ungated_heads=1 conv_width=6" \
        --variant "ungated_heads=[0,1] conv_width=6 write_gate=true"

A variant is a space-separated list of `convert.student.KEY=VALUE` overrides on top of
`kind=lawcat` (values as on the command line: `[0,1]` is one count of ungated heads per layer).
`--jobs N` trains N students at once, one thread each. Writes
benchmarks/results/lawcat_passkey_sweep.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from conversion import lawcat_recipe  # benchmarks/ is sys.path[0] when run as a script
from machine import cpu_name

from ctxscale.launch.convert import convert, load_convert_config
from ctxscale.launch.evaluate import EvalJob, evaluate_models

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def run_student(a, teacher: str, variant: str, seed: int, lengths: list[int]) -> dict:
    """Convert one LAWCAT student (attention transfer + full fine-tune at L) and evaluate it."""
    torch.set_num_threads(1)
    work, L = Path(a.work), a.seq_len
    name = re.sub(r"[^A-Za-z0-9]+", "-", f"lawcat {variant} s{seed}").strip("-")
    out = work / "sweep" / name
    if out.exists():  # convert resumes from checkpoints it finds: start clean
        shutil.rmtree(out)
    t0 = time.perf_counter()
    s = convert(load_convert_config(None, [
        "model.dim=64", f"model.num_layers={a.layers}", "model.num_heads=4",
        "model.num_kv_heads=2", "data.kind=text", f"data.text_files=[{TEXT}]",
        "data.tokenizer_vocab_size=512", f"data.seq_len={L}", f"data.cache_dir={work / 'cache'}",
        f"run.batch_size={a.batch}", "run.device=cpu", "run.eval_batches=8",
        "run.tensorboard=false", "run.log_every=50", "checkpoint.every=0", f"run.seed={seed}",
        f"run.output_dir={out}", f"convert.passkey_fraction={a.passkey_fraction}",
        f"convert.passkey_answer_weight={a.answer_weight}", f"convert.teacher={teacher}",
        "convert.student.kind=lawcat", f"convert.transfer.steps={a.transfer_steps}",
        "convert.transfer.loss=both", f"convert.finetune.steps={a.finetune_steps}",
        "convert.finetune.method=full", f"convert.finetune.optim.lr={a.finetune_lr}",
        *(f"convert.student.{kv}" for kv in variant.split())]))
    wall = time.perf_counter() - t0
    job = EvalJob(models=[s["model_dir"]], labels=[name], batch_size=a.batch, eval_batches=8,
                  passkey_lengths=lengths, passkey_samples=a.passkey_samples,
                  output_dir=str(out / "eval"))
    job.data.kind, job.data.text_files, job.data.seq_len = "text", [str(TEXT)], L
    job.data.tokenizer_vocab_size, job.data.cache_dir = 512, str(work / "cache")
    r = evaluate_models(job)[name]
    row = {"variant": variant, "seed": seed, "perplexity": r["perplexity"], "wall_s": wall,
           "passkey": {int(k): v["accuracy"] for k, v in r["passkey"].items()}}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--variant", action="append",
                   help="convert.student overrides, space-separated (repeat for more variants); "
                        "default: the recipe of configs/convert_lawcat.yaml")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--seq-len", type=int, default=192)
    p.add_argument("--layers", type=int, default=2, help="must match the teacher")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--transfer-steps", type=int, default=400)
    p.add_argument("--finetune-steps", type=int, default=2500)
    p.add_argument("--finetune-lr", type=float, default=2e-3)
    p.add_argument("--passkey-fraction", type=float, default=0.75)
    p.add_argument("--answer-weight", type=float, default=20.0)
    p.add_argument("--passkey-samples", type=int, default=8)
    p.add_argument("--max-factor", type=int, default=16)
    p.add_argument("--jobs", type=int, default=1, help="students trained at once (one thread each)")
    p.add_argument("--work", default="runs/bench_conversion")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    if not a.variant:
        a.variant = [lawcat_recipe()]
    work, L = Path(a.work), a.seq_len
    summary = work / "teacher_summary.json"
    if not summary.is_file():
        raise SystemExit(f"{summary} not found: run benchmarks/conversion.py first (it trains "
                         "the teacher), with the same --work")
    teacher = json.loads(summary.read_text())[0]["model_dir"]
    seeds = [int(s) for s in a.seeds.split(",")]
    lengths = [L * f for f in (1, 2, 4, 8, 16, 32) if f <= a.max_factor]
    tasks = [(a, teacher, v, seed, lengths) for v in a.variant for seed in seeds]
    if a.jobs > 1:
        with ProcessPoolExecutor(a.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            rows = list(pool.map(run_student, *zip(*tasks)))
    else:
        rows = [run_student(*t) for t in tasks]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(a).items()
                     if k not in ("work", "out", "variant"))
    flags += "".join(f' --variant "{v}"' for v in a.variant)
    head = ["variant (convert.student)", "seed", "perplexity"] + [f"passkey@{n}" for n in lengths]
    lines = [f"# LAWCAT passkey sweep (distilled at L = {L})", "", f"Machine: {cpu_name()}, "
             f"torch {torch.__version__}", "", f"Command: `python benchmarks/lawcat_passkey_sweep.py "
             f"{flags}`", "", f"Teacher: `{teacher}`; {a.passkey_samples} prompts per depth at 5 "
             "depths per length; a prompt counts only if every answer token is right.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [f"`{row['variant']}`", str(row["seed"]), f"{row['perplexity']:.2f}"]
        cells += [f"{row['passkey'][n]:.2f}" for n in lengths]
        lines.append("| " + " | ".join(cells) + " |")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lawcat_passkey_sweep.md").write_text("\n".join(lines) + "\n")
    (out_dir / "lawcat_passkey_sweep.json").write_text(json.dumps({"args": vars(a), "rows": rows},
                                                                  indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
