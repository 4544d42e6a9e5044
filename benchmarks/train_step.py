"""One training step (forward + backward + AdamW) of ctxscale's Transformer vs Hugging Face's
`LlamaForCausalLM` of the same size, float32 on CPU, batch 1, at several sequence lengths.

    python benchmarks/train_step.py                       # 1K, 4K, 16K; writes the results file
    python benchmarks/train_step.py --seq-lens 1024 --repeats 1 --steps 2 --no-write

Each (model, sequence length, repeat) runs in a fresh subprocess so that its peak memory is its
own: peak = VmHWM at the end minus VmRSS just before the model is built (parameters, gradients,
AdamW state, activations, logits). Runs are interleaved (ctxscale, HF, HF, ctxscale, ...) and
step times pooled over repeats; the table shows medians. Both models get the same shapes, the
same random tokens and their standard loss: ctxscale's chunked linear cross-entropy
(`model(ids, labels=...)`), HF's `labels=` loss with `attn_implementation="sdpa"`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "train_step_cpu.md"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def worker(args) -> dict:
    import torch

    torch.manual_seed(0)
    shape = dict(dim=args.dim, layers=args.layers, heads=args.heads, kv_heads=args.kv_heads,
                 ffn=args.ffn, vocab=args.vocab)
    seq = args.seq
    tokens = torch.randint(0, args.vocab, (1, seq + 1))
    warm = min(seq, args.warmup_seq)  # warm-up step (AdamW state, thread pools) on a prefix
    if args.model == "hf":
        import transformers

        cfg = transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=args.dim, intermediate_size=args.ffn,
            num_hidden_layers=args.layers, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, max_position_embeddings=max(seq, 2048),
            rms_norm_eps=1e-5, tie_word_embeddings=False, use_cache=False,
        )
        base_kb = _status_kb("VmRSS")
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
        def loss_fn(n):
            ids = tokens[:, :n]
            return model(input_ids=ids, labels=ids, use_cache=False).loss
    else:
        from ctxscale.models import ModelConfig, build_model

        cfg = ModelConfig(vocab_size=args.vocab, dim=args.dim, num_layers=args.layers,
                          num_heads=args.heads, num_kv_heads=args.kv_heads, ffn_dim=args.ffn,
                          max_seq_len=max(seq, 2048))
        base_kb = _status_kb("VmRSS")
        model = build_model(cfg)
        def loss_fn(n):
            return model(tokens[:, :n], labels=tokens[:, 1 : n + 1], loss_reduction="mean")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times, cpu_times, losses = [], [], []
    for step in range(args.steps + 1):  # step 0 is the warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        loss = loss_fn(seq if step > 0 else warm)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        losses.append(float(loss))
        del loss
        if step > 0:
            times.append(dt)
            cpu_times.append(dc)
    peak_kb = _status_kb("VmHWM") - base_kb
    return {"model": args.model, "seq": seq, "times": times, "cpu_times": cpu_times,
            "losses": losses,
            "peak_mib": peak_kb / 1024, "threads": torch.get_num_threads(), **shape}


def _run_worker(model: str, seq: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", model, "--seq", str(seq), "--steps", str(args.steps),
           "--warmup-seq", str(args.warmup_seq),
           "--dim", str(args.dim), "--layers", str(args.layers), "--heads", str(args.heads),
           "--kv-heads", str(args.kv_heads), "--ffn", str(args.ffn), "--vocab", str(args.vocab)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"worker {model} seq={seq} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])




def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--steps", type=int, default=2, help="timed steps per run (after 1 warm-up)")
    p.add_argument("--warmup-seq", type=int, default=1024, help="tokens in the warm-up step")
    p.add_argument("--repeats", type=int, default=2, help="runs per model and length (interleaved)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=688)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--no-write", action="store_true", help="print only; keep the results file")
    p.add_argument("--worker", choices=["ctxscale", "hf"], help=argparse.SUPPRESS)
    p.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.model = args.worker
        print(json.dumps(worker(args)))
        return

    import torch
    import transformers

    rows = []
    for seq in args.seq_lens:
        runs = {"ctxscale": [], "hf": []}
        for r in range(args.repeats):
            order = ("ctxscale", "hf") if r % 2 == 0 else ("hf", "ctxscale")
            for model in order:
                res = _run_worker(model, seq, args)
                runs[model].append(res)
                print(f"seq={seq} {model:8s} step times {[round(t, 2) for t in res['times']]} s "
                      f"(CPU {[round(t, 2) for t in res['cpu_times']]} s), "
                      f"peak {res['peak_mib']:.0f} MiB, loss {res['losses'][0]:.3f}", flush=True)
        stats = {}
        for model, rs in runs.items():
            times = [t for r in rs for t in r["times"]]
            cpu = [t for r in rs for t in r["cpu_times"]]
            stats[model] = (seq / statistics.median(times), statistics.median(r["peak_mib"] for r in rs),
                            statistics.median(cpu))
        rows.append((seq, stats))

    cores = os.cpu_count()
    head = (
        f"Machine: {cpu_name()}, {cores} cores visible, {torch.get_num_threads()} torch threads "
        f"(shared with other jobs: timings are noisy, medians over {args.repeats} interleaved runs "
        f"x {args.steps} timed steps after a warm-up step of "
        f"{args.warmup_seq} tokens).\n"
        f"torch {torch.__version__}, transformers {transformers.__version__}, Python "
        f"{platform.python_version()}.\n\n"
        f"Model: dim {args.dim}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), "
        f"ffn {args.ffn}, vocab {args.vocab}; float32, batch 1, one step = forward + backward + "
        "AdamW. HF: `LlamaForCausalLM`, `attn_implementation=\"sdpa\"`, `labels=` loss. Peak "
        "memory: VmHWM of a fresh process minus its RSS before the model is built. CPU-s/step: "
        "process CPU time per step (user+system, all threads), less sensitive than wall time to "
        "other jobs on the machine.\n\n"
    )
    table = ["| seq | ctxscale tok/s | HF tok/s | tok/s ratio (ctxscale/HF) | CPU-s/step ctxscale "
             "| CPU-s/step HF | CPU-time ratio (HF/ctxscale) | ctxscale peak MiB | HF peak MiB "
             "| memory ratio (ctxscale/HF) |", "|---|---|---|---|---|---|---|---|---|---|"]
    for seq, st in rows:
        (ct, cm, cc), (ht, hm, hc) = st["ctxscale"], st["hf"]
        table.append(f"| {seq} | {ct:.0f} | {ht:.0f} | **{ct / ht:.2f}x** | {cc:.1f} | {hc:.1f} | "
                     f"{hc / cc:.2f}x | {cm:.0f} | {hm:.0f} | **{cm / hm:.2f}x** |")
    text = "# One training step, ctxscale vs Hugging Face Llama (CPU, float32)\n\n" + head + \
        "\n".join(table) + "\n\nCommand: `python benchmarks/train_step.py " + \
        " ".join(sys.argv[1:]) + "`\n"
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
