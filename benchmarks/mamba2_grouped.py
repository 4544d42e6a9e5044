"""Mamba-2's scan with B and C read once per group (grouped q/k linear attention) against the
same mixer with B and C copied to every head of their group before the scan (the baseline, what
ctxscale did before: `repeat_interleave` over the heads), in one run on one process, float32.

Reports the bytes autograd saves for the backward in one forward (distinct storages) and the best
forward+backward time of each, with the ratio baseline / grouped. Writes
`benchmarks/results/mamba2_grouped_cpu.md`.

    python benchmarks/mamba2_grouped.py [--seq 8192] [--groups 1 4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
from pathlib import Path

import torch
from machine import best_fwd_bwd, cpu_name  # benchmarks/ is sys.path[0] when run as a script

from ctxscale.models.config import MambaConfig, ModelConfig
from ctxscale.models.mamba2 import Mamba2Mixer

LA = importlib.import_module("ctxscale.kernels.linear_attention")  # the module, not the function


@contextlib.contextmanager
def per_head_copies():
    """The baseline: the scan's q (C) and k (B) expanded to one copy per head."""
    original = LA.linear_attention

    def copied(q, k, v, **kw):
        r = v.shape[2] // q.shape[2]
        return original(q.repeat_interleave(r, 2), k.repeat_interleave(r, 2), v, **kw)

    LA.linear_attention = copied
    try:
        yield
    finally:
        LA.linear_attention = original


def saved_bytes(mixer, x) -> int:
    """Bytes of the distinct storages autograd keeps for the backward of one forward."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        mixer(x)
    return sum(seen.values())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--d-state", type=int, default=64)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "mamba2_grouped_cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for groups in args.groups:
        cfg = ModelConfig(family="mamba2", dim=args.dim, num_layers=1, num_heads=4, vocab_size=8,
                          mamba=MambaConfig(d_state=args.d_state, expand=2,
                                            head_dim=args.head_dim, n_groups=groups))
        torch.manual_seed(0)
        mixer = Mamba2Mixer(cfg)
        x = torch.randn(1, args.seq, args.dim, requires_grad=True)
        grouped = (saved_bytes(mixer, x), best_fwd_bwd(mixer, x, repeats=args.repeats))
        with per_head_copies():
            base = (saved_bytes(mixer, x), best_fwd_bwd(mixer, x, repeats=args.repeats))
        rows.append((groups, mixer.heads, base, grouped))
        print(f"groups {groups}: saved {base[0] / 2**20:.1f} -> {grouped[0] / 2**20:.1f} MiB, "
              f"fwd+bwd {base[1]:.3f} -> {grouped[1]:.3f} s", flush=True)
    lines = [
        "# Mamba-2: B and C per group vs copied per head (CPU)", "",
        f"- machine: {cpu_name()}, {args.threads} torch thread(s); float32, batch 1",
        f"- command: `python benchmarks/mamba2_grouped.py --seq {args.seq} --groups "
        f"{' '.join(map(str, args.groups))} --repeats {args.repeats}`",
        f"- Mamba2Mixer dim {args.dim}, expand 2, head_dim {args.head_dim}, d_state {args.d_state}, "
        f"{args.seq} tokens; baseline = the same mixer with the scan's B and C repeated over the "
        "heads of their group; saved = distinct storages autograd keeps for the backward; time = "
        f"best of {args.repeats} forward+backward after a warm-up", "",
        "| groups | heads | saved, per-head copies | saved, per group | x less | fwd+bwd, copies | "
        "fwd+bwd, per group | x faster |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for groups, heads, (b_mem, b_t), (g_mem, g_t) in rows:
        lines.append(f"| {groups} | {heads} | {b_mem / 2**20:.1f} MiB | {g_mem / 2**20:.1f} MiB | "
                     f"{b_mem / g_mem:.2f} | {b_t * 1e3:.0f} ms | {g_t * 1e3:.0f} ms | "
                     f"{b_t / g_t:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
