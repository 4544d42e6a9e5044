"""The cost of document resets (packed rows, `data.document_mask`) in the recurrent layers: each
mixer's forward+backward on a packed row with its document ids against the same row without
them (the baseline: state carried across documents), in one run on one process, float32.

Layers: Mamba-1 (conv + chunked selective scan, whose chunks run as a log-depth scan with
resets), Mamba-2 (conv + chunked linear attention with document masks), a `decay` linear
attention layer, and Titans blocks (mac: segments of 32; mag: memory chunks of 16 and a window
of 32), whose documents are laid out padded to whole segments / chunks. Writes
`benchmarks/results/recurrent_documents_cpu.md`.

    python benchmarks/recurrent_documents.py [--seq 8192] [--doc-len 1024] [--repeats 3]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn as nn
from machine import best_fwd_bwd, cpu_name  # benchmarks/ is sys.path[0] when run as a script

from ctxscale.models.config import LinearAttentionConfig, MambaConfig, ModelConfig, TitansConfig
from ctxscale.models.linear_attention import LinearAttention
from ctxscale.models.mamba import MambaMixer
from ctxscale.models.mamba2 import Mamba2Mixer
from ctxscale.models.titans import Titans
from ctxscale.models.titans_documents import DocumentLayout


class WithDocuments(nn.Module):
    """`layer(x, document_ids=ids)` as a one-argument module (ids None: the baseline)."""

    def __init__(self, layer, ids):
        super().__init__()
        self.layer, self.ids = layer, ids

    def forward(self, x):
        if isinstance(self.layer, LinearAttention):
            return self.layer(x, None, None, document_ids=self.ids)
        if hasattr(self.layer, "memory"):  # a Titans block, positions 0.. (timing only)
            t = self.layer
            unit = t.segment_len if t.variant == "mac" else t.chunk_size
            layout = None if self.ids is None else DocumentLayout.build(self.ids, unit)
            hd = t.attention.head_dim
            cos, sin = x.new_ones(1, x.shape[1], hd), x.new_zeros(1, x.shape[1], hd)
            return t(x, cos, sin, None, layout, self.ids)[0]
        return self.layer(x, document_ids=self.ids)


def layers(dim: int):
    mamba = MambaConfig(d_state=16, expand=2, head_dim=32, n_groups=1)
    cfg = ModelConfig(family="hybrid", dim=dim, num_layers=1, num_heads=dim // 64, vocab_size=8,
                      mamba=mamba, linear_attention=LinearAttentionConfig(kind="decay"))
    cfg2 = ModelConfig(family="mamba2", dim=dim, num_layers=1, num_heads=4, vocab_size=8,
                       mamba=MambaConfig(d_state=64, expand=2, head_dim=32, n_groups=1))
    titans = {
        variant: Titans(ModelConfig(
            family="titans", dim=dim, num_layers=1, num_heads=dim // 64, vocab_size=8,
            titans=TitansConfig(variant=variant, chunk_size=16, segment_len=32, window=32)
        )).layers["0"]
        for variant in ("mac", "mag")}
    return {"Mamba-1 mixer (d_state 16)": MambaMixer(cfg),
            "Mamba-2 mixer (d_state 64, head_dim 32)": Mamba2Mixer(cfg2),
            "linear attention, decay (head_dim 64)": LinearAttention(cfg),
            "Titans block, mac (segments 32, chunks 16)": titans["mac"],
            "Titans block, mag (chunks 16, window 32)": titans["mag"]}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--doc-len", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                        "recurrent_documents_cpu.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    ids = (torch.arange(args.seq) // args.doc_len).unsqueeze(0)
    rows = []
    torch.manual_seed(0)
    for name, layer in layers(args.dim).items():
        x = torch.randn(1, args.seq, args.dim, requires_grad=True)
        plain = best_fwd_bwd(WithDocuments(layer, None), x, repeats=args.repeats)
        docs = best_fwd_bwd(WithDocuments(layer, ids), x, repeats=args.repeats)
        rows.append((name, plain, docs))
        print(f"{name}: {plain:.3f} s without documents, {docs:.3f} s with", flush=True)
    lines = [
        "# Recurrent layers with document resets vs without (CPU)", "",
        f"- machine: {cpu_name()}, {args.threads} torch thread(s); float32, batch 1, dim {args.dim}",
        f"- command: `python benchmarks/recurrent_documents.py --seq {args.seq} --doc-len "
        f"{args.doc_len} --repeats {args.repeats}`",
        f"- {args.seq} tokens packed from documents of {args.doc_len}; baseline = the same layer "
        "and row without document ids (the state crosses documents); time = best of "
        f"{args.repeats} forward+backward after a warm-up", "",
        "| layer | fwd+bwd, no documents | fwd+bwd, with documents | with / without |",
        "|---|---:|---:|---:|",
    ]
    for name, plain, docs in rows:
        lines.append(f"| {name} | {plain * 1e3:.0f} ms | {docs * 1e3:.0f} ms | {docs / plain:.2f} |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
