"""`ctxscale generate`: decoding speed with the KV cache / recurrent states against rerunning the
whole sequence for every new token (the baseline, what a model without `step` does), per
family, in the same run on the same model, prompt and greedy tokens (asserted equal).

    python benchmarks/generate.py                     # prompt 512, 64 new tokens, batch 1
    python benchmarks/generate.py --prompt 128 --new 32 --no-write

Models: dim 256, 4 layers, 8 heads (4 kv heads), vocabulary 4096, random weights; one thread.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT.parent))
RESULTS = ROOT / "benchmarks" / "results" / "generate_cpu.md"

FAMILIES = {
    "transformer": dict(family="transformer"),
    "linear (lawcat)": dict(family="linear"),
    "mamba2": dict(family="mamba2"),
    "hybrid LMSA": dict(family="hybrid", layer_pattern="LMSA"),
    "titans mag": dict(family="titans"),
}


def _model(spec):
    from ctxscale.models import build_model
    from ctxscale.models.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(vocab_size=4096, dim=256, num_layers=4, num_heads=8,
                                num_kv_heads=4, max_seq_len=4096), **spec})
    if cfg.family == "linear":
        cfg.linear_attention.kind = "lawcat"
    cfg.mamba.head_dim = 32
    cfg.titans.variant = "mag"
    return build_model(cfg).eval()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    from ctxscale.launch.generate import generate

    torch.set_num_threads(1)
    prompt = torch.randint(0, 4096, (1, a.prompt), generator=torch.Generator().manual_seed(0))
    rows = [f"# Decoding with state against rerunning the sequence ({cpu_name()}, 1 thread)", "",
            "Command: `python benchmarks/generate.py"
            + ("`" if (a.prompt, a.new) == (512, 64) else f" --prompt {a.prompt} --new {a.new}`"),
            "", f"Prompt {a.prompt} tokens, {a.new} new tokens (greedy), batch 1.", "",
            "| family | cached (s) | rerun (s) | cached tokens/s | speed-up |", "|---|---|---|---|---|"]
    for name, spec in FAMILIES.items():
        model = _model(spec)
        times, outs = {}, {}
        for mode in (True, False):
            generate(model, prompt[:, :16], max_new_tokens=2, temperature=0, use_cache=mode)
            t0 = time.perf_counter()
            outs[mode] = generate(model, prompt, max_new_tokens=a.new, temperature=0,
                                  use_cache=mode)
            times[mode] = time.perf_counter() - t0
        assert torch.equal(outs[True], outs[False]), name
        rows.append(f"| {name} | {times[True]:.2f} | {times[False]:.2f} | "
                    f"{a.new / times[True]:.1f} | {times[False] / times[True]:.1f}x |")
        print(rows[-1], flush=True)
    print("\n".join(rows))
    if not a.no_write:
        RESULTS.write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
