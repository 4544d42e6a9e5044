"""LoLCATs sliding-window + linear attention (models/window_attention.py): length scaling on CPU.

Forward+backward time per token of one layer, batch 1, float32, single process: Hedgehog linear
attention (RoPE before the feature map), the same layer with a LoLCATs window of 64 tokens, and
the Transformer's softmax attention as the quadratic baseline. The windowed layer should stay
linear-time (time per token flat, within ~1.3x of its first length) and cost a constant factor
over the plain linear layer; softmax grows with the length. Ratios come from the same run.
Writes `benchmarks/results/window_attention_cpu.md`.

    python benchmarks/window_attention_scaling.py [--lengths 1024,4096,16384] [--window 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from machine import best_fwd_bwd, cpu_name  # benchmarks/ is sys.path[0] when run as a script

from ctxscale.dist.context import SINGLE
from ctxscale.kernels.rotary import rope_cos_sin, rope_inv_freq
from ctxscale.models.config import LinearAttentionConfig, ModelConfig
from ctxscale.models.linear_attention import LinearAttention
from ctxscale.models.transformer import Attention


def layers(dim: int, heads: int, window: int):
    base = dict(family="linear", vocab_size=8, dim=dim, num_layers=2, num_heads=heads)
    yield "hedgehog (rope)", LinearAttention(ModelConfig(
        **base, linear_attention=LinearAttentionConfig(kind="hedgehog", rope=True)))
    yield f"hedgehog + window {window}", LinearAttention(ModelConfig(
        **base, linear_attention=LinearAttentionConfig(kind="hedgehog", rope=True, window=window)))
    yield "softmax attention", Attention(ModelConfig(**{**base, "family": "transformer"}), SINGLE)


def time_fwd_bwd(layer, n: int, dim: int, repeats: int) -> float:
    x = torch.randn(1, n, dim, requires_grad=True)
    inv_freq, scaling = rope_inv_freq(layer.head_dim, 10000.0)
    cos, sin = rope_cos_sin(torch.arange(n).unsqueeze(0), inv_freq, scaling)
    return best_fwd_bwd(layer, x, cos, sin, repeats=repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="1024,4096,16384")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--window", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/window_attention_cpu.md")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    lengths = [int(x) for x in a.lengths.split(",")]
    rows, linear = [], {}
    for name, layer in layers(a.dim, a.heads, a.window):
        base = None
        for n in lengths:
            per_tok = time_fwd_bwd(layer, n, a.dim, a.repeats) / n * 1e6
            base = base or per_tok
            linear.setdefault(n, per_tok)  # the first layer is the plain linear one
            rows.append((name, n, per_tok, per_tok / base, per_tok / linear[n]))
            print(f"{name:24s} {n:>7d} tokens {per_tok:8.2f} us/token  x{per_tok / base:.2f} "
                  f"vs first length, x{per_tok / linear[n]:.2f} vs linear", flush=True)
    lines = [
        "# LoLCATs window + linear attention: forward+backward time per token vs length (CPU)",
        "",
        f"Machine: {cpu_name()}, {torch.get_num_threads()} thread(s); torch {torch.__version__}.",
        f"One layer, batch 1, dim {a.dim}, {a.heads} heads (head dim {a.dim // a.heads}), float32; "
        f"best of {a.repeats} after a warm-up. Shared host: single numbers are noisy.",
        "",
        "Command: `python benchmarks/window_attention_scaling.py "
        f"--lengths {a.lengths} --dim {a.dim} --heads {a.heads} --window {a.window}`",
        "",
        "| layer | tokens | us / token | ratio to first length | ratio to hedgehog (same length) |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} |" for r in rows]
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
