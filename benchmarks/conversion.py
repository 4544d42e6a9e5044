"""Conversion benchmark: teacher -> Hedgehog / LAWCAT, against from-scratch linear baselines.

1. pretrain a softmax teacher on tinyshakespeare mixed with passkey rows at length L;
2. convert it (attention transfer + fine-tune, LoRA or full) to Hedgehog and to LAWCAT at
   length L, and with --window W to a LoLCATs hybrid (Hedgehog + a softmax window of W keys);
3. train the same linear architectures from scratch on the same token budget as the conversion;
4. evaluate all of them: held-out perplexity, passkey accuracy at L, 2L, ..., 16L, MQAR, and the
   window ablations.

Writes benchmarks/results/conversion.{md,json} and conversion_passkey.png, stating the machine.
The command of the committed results is written at the top of conversion.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shlex
import shutil
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script

from ctxscale.launch.convert import convert, load_convert_config
from ctxscale.launch.evaluate import EvalJob, evaluate_models, markdown_table

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


def machine() -> str:
    cpu = cpu_name()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}"


def lawcat_recipe() -> str:
    """The LAWCAT student of configs/convert_lawcat.yaml as space-separated convert.student
    overrides (what the students of these benchmarks use unless told otherwise)."""
    student = load_convert_config(ROOT / "configs" / "convert_lawcat.yaml").convert.student
    values = {f.name: getattr(student, f.name) for f in dataclasses.fields(student)
              if f.name not in ("kind", "window")}  # the benchmark sets those itself
    return " ".join(f"{k}={v if isinstance(v, str) else json.dumps(v).replace(' ', '')}"
                    for k, v in values.items())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq-len", type=int, default=192)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--teacher-steps", type=int, default=4000)
    p.add_argument("--teacher-lr", type=float, default=3e-3)
    p.add_argument("--transfer-steps", type=int, default=100)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--finetune-method", choices=["lora", "full"], default="lora")
    p.add_argument("--finetune-lr", type=float, default=3e-3)
    p.add_argument("--passkey-fraction", type=float, default=0.5)
    p.add_argument("--answer-weight", type=float, default=20.0,
                   help="convert.passkey_answer_weight, for the teacher and every student")
    p.add_argument("--window", type=int, default=0,
                   help="also convert a LoLCATs hybrid: hedgehog + a softmax window of this size")
    p.add_argument("--lawcat", default=None,
                   help="convert.student overrides of the LAWCAT students (converted and scratch), "
                        "space-separated KEY=VALUE; default: the student of "
                        "configs/convert_lawcat.yaml")
    p.add_argument("--reuse-teacher", action="store_true",
                   help="take <work>/teacher from an earlier run with the same teacher flags")
    p.add_argument("--passkey-samples", type=int, default=4)
    p.add_argument("--max-factor", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--work", default="runs/bench_conversion")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    a = p.parse_args()
    if a.lawcat is None:
        a.lawcat = lawcat_recipe()
    torch.set_num_threads(1)
    work, L = Path(a.work), a.seq_len
    common = [
        f"model.dim={a.dim}", f"model.num_layers={a.layers}", "model.num_heads=4",
        "model.num_kv_heads=2", "data.kind=text", f"data.text_files=[{TEXT}]",
        "data.tokenizer_vocab_size=512", f"data.seq_len={L}", f"data.cache_dir={work / 'cache'}",
        f"run.batch_size={a.batch}", f"run.device={a.device}", "run.eval_batches=8",
        "run.tensorboard=false", "run.log_every=50", "checkpoint.every=0",
        f"convert.passkey_fraction={a.passkey_fraction}",
        f"convert.passkey_answer_weight={a.answer_weight}",
    ]
    timings = {}

    def run(name, *extra):
        if (work / name).exists():  # convert resumes from checkpoints it finds: start clean
            print(f"removing the previous run in {work / name}", flush=True)
            shutil.rmtree(work / name)
        t0 = time.perf_counter()
        s = convert(load_convert_config(None, common + [f"run.output_dir={work / name}", *extra]))
        timings[name] = time.perf_counter() - t0
        print(f"{name}: eval loss {s['eval_loss']:.3f} in {timings[name]:.0f} s", flush=True)
        return s

    teacher_args = ("convert.init=scratch", "convert.student.kind=softmax",
                    "convert.transfer.steps=0", "convert.finetune.method=full",
                    f"convert.finetune.steps={a.teacher_steps}",
                    f"convert.finetune.optim.lr={a.teacher_lr}",
                    "convert.finetune.optim.warmup_steps=20", "convert.finetune.optim.weight_decay=0.1")
    previous = work / "teacher_summary.json"
    if a.reuse_teacher and previous.is_file():
        teacher, timings["teacher"] = json.loads(previous.read_text())
        print(f"teacher: reused {teacher['model_dir']}", flush=True)
    else:
        teacher = run("teacher", *teacher_args)
        previous.write_text(json.dumps([{k: teacher[k] for k in ("model_dir", "tokens", "eval_loss")},
                                        timings["teacher"]]))
    summaries = {"teacher": teacher}
    budget_steps = a.transfer_steps + a.finetune_steps
    students = [("hedgehog", "hedgehog", 0), ("lawcat", "lawcat", 0)]
    if a.window:
        students.append((f"hedgehog_window{a.window}", "hedgehog", a.window))
    for name, kind, window in students:
        lawcat_opts = [f"convert.student.{kv}" for kv in a.lawcat.split()] if kind == "lawcat" else []
        summaries[name] = run(
            name, *lawcat_opts, f"convert.teacher={teacher['model_dir']}", f"convert.student.kind={kind}",
            f"convert.student.window={window}", f"convert.transfer.steps={a.transfer_steps}",
            "convert.transfer.loss=both", f"convert.finetune.steps={a.finetune_steps}",
            f"convert.finetune.method={a.finetune_method}",
            f"convert.finetune.optim.lr={a.finetune_lr}")
        if window:
            continue  # the from-scratch baselines are the plain linear architectures
        summaries[f"{kind}_scratch"] = run(
            f"{kind}_scratch", *lawcat_opts, "convert.init=scratch", f"convert.student.kind={kind}",
            "convert.transfer.steps=0", "convert.finetune.method=full",
            f"convert.finetune.steps={budget_steps}", f"convert.finetune.optim.lr={a.finetune_lr}")
    names = list(summaries)
    lengths = [L * f for f in (1, 2, 4, 8, 16, 32) if f <= a.max_factor]
    job = EvalJob(models=[summaries[n]["model_dir"] for n in names], labels=names,
                  batch_size=a.batch, eval_batches=8, passkey_lengths=lengths,
                  passkey_samples=a.passkey_samples, mqar_samples=32,
                  output_dir=str(work / "eval"))
    job.data.kind, job.data.text_files, job.data.seq_len = "text", [str(TEXT)], L
    job.data.tokenizer_vocab_size, job.data.cache_dir = 512, str(work / "cache")
    results = evaluate_models(job)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ppl_t = results["teacher"]["perplexity"]
    flags = " ".join(f"--{k.replace('_', '-')}" + ("" if isinstance(v, bool) else f" {shlex.quote(str(v))}")
                     for k, v in vars(a).items()
                     if k not in ("device", "work", "out") and v is not False)
    lines = [f"# Conversion benchmark (L = {L})", "", f"Machine: {machine()}", "",
             f"Command: `python benchmarks/conversion.py {flags}`", "",
             "Passkey accuracy: a prompt counts only if every answer token is right "
             f"({a.passkey_samples} prompts at each of the evaluation depths per length).", "",
             markdown_table(results), "",
             "| model | perplexity / teacher | training tokens | wall s |", "|---|---|---|---|"]
    for n in names:
        lines.append(f"| {n} | {results[n]['perplexity'] / ppl_t:.3f} | {summaries[n]['tokens']} | "
                     f"{timings[n]:.0f} |")
    (out / "conversion.md").write_text("\n".join(lines) + "\n")
    (out / "conversion.json").write_text(json.dumps(
        {"machine": machine(), "args": vars(a), "results": results,
         "tokens": {n: summaries[n]["tokens"] for n in names}, "wall_s": timings}, indent=1,
        default=str))
    png = work / "eval" / "passkey.png"
    if png.is_file():
        (out / "conversion_passkey.png").write_bytes(png.read_bytes())
    print("\n".join(lines))
    assert math.isfinite(ppl_t)


if __name__ == "__main__":
    main()
