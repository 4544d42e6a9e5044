"""Length scaling of recurrent LAYERS on CPU: forward+backward time per token, 4K -> 256K tokens.

A linear-attention layer (LAWCAT: conv on q/k + gated, normalized linear attention; and plain)
a Mamba-1 and a Mamba-2 mixer, batch 1, float32, on one process. Linear-time layers should keep the time
per token flat: the table reports each length's time per token as a ratio to the 4K run of the
same layer, measured in the same run (target: within 1.3x). The CPU allocator is tuned as in
training (`ctxscale.launch.env.tune_cpu_allocator`; CTXSCALE_CPU_MALLOC=system to compare). Writes
`benchmarks/results/recurrent_layers_cpu.md`.

    python benchmarks/recurrent_layers_scaling.py [--lengths 4096,16384,65536,262144]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from machine import best_fwd_bwd, cpu_name  # benchmarks/ is sys.path[0] when run as a script

from ctxscale.launch.env import tune_cpu_allocator
from ctxscale.models.config import LinearAttentionConfig, MambaConfig, ModelConfig
from ctxscale.models.linear_attention import LinearAttention
from ctxscale.models.mamba import MambaMixer
from ctxscale.models.mamba2 import Mamba2Mixer


def layers(dim: int, heads: int):
    base = dict(family="linear", vocab_size=8, dim=dim, num_layers=2, num_heads=heads)
    yield "linear (lawcat)", LinearAttention(ModelConfig(
        **base, linear_attention=LinearAttentionConfig(kind="lawcat")))
    yield "linear (plain)", LinearAttention(ModelConfig(
        **base, linear_attention=LinearAttentionConfig(kind="plain")))
    yield "mamba", MambaMixer(ModelConfig(**{**base, "family": "mamba"},
                                          mamba=MambaConfig(d_state=16, expand=2)))
    # Mamba-2 at the same width: 128 channels in 8 heads of 16, 1 group of d_state 64
    yield "mamba2", Mamba2Mixer(ModelConfig(**{**base, "family": "mamba2"}, mamba=MambaConfig(
        d_state=64, expand=2, head_dim=16, n_groups=1)))


def time_fwd_bwd(layer, n: int, dim: int, repeats: int) -> float:
    x = torch.randn(1, n, dim, requires_grad=True)
    return best_fwd_bwd(layer, x, repeats=repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="4096,16384,65536,262144")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/recurrent_layers_cpu.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    # as a training job on the CPU does (launch/env.py); CTXSCALE_CPU_MALLOC=system measures glibc's
    # default mmap-per-large-tensor behaviour instead
    allocator = "glibc reuse (tune_cpu_allocator)" if tune_cpu_allocator() else "glibc default"
    print(f"allocator: {allocator}", flush=True)
    torch.manual_seed(0)
    lengths = [int(x) for x in a.lengths.split(",")]
    rows = []
    for name, layer in layers(a.dim, a.heads):
        base = None
        for n in lengths:
            t = time_fwd_bwd(layer, n, a.dim, a.repeats)
            per_tok = t / n * 1e6
            base = base or per_tok
            rows.append((name, n, t, per_tok, per_tok / base))
            print(f"{name:16s} {n:>8d} tokens  {t:8.3f} s  {per_tok:7.2f} us/token  x{per_tok / base:.2f}",
                  flush=True)
    lines = [
        "# Recurrent layers: forward+backward time per token vs sequence length (CPU)",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} thread(s) used "
        f"(of {torch.get_num_interop_threads()} interop / shared host); torch {torch.__version__}; "
        f"CPU allocator: {allocator}.",
        f"One layer, batch 1, dim {a.dim}, {a.heads} heads, float32; best of {a.repeats} after a "
        "warm-up. Ratio = time per token / time per token at the first length (same run). "
        "Target: ratio <= 1.3 (linear time). The host is shared with other jobs, so single "
        "numbers are noisy.",
        "",
        "Command: `python benchmarks/recurrent_layers_scaling.py "
        f"--lengths {a.lengths} --dim {a.dim} --heads {a.heads} --repeats {a.repeats}`",
        "",
        "| layer | tokens | fwd+bwd s | us / token | ratio to first |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.3f} | {r[3]:.2f} | {r[4]:.2f} |" for r in rows]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
