"""Shared helpers for the recurrent model tests: small odd-sized configs and weight perturbation."""

from __future__ import annotations

import torch

from ctxscale.models.config import LinearAttentionConfig, MambaConfig, ModelConfig

KINDS = ("plain", "decay", "hedgehog", "lawcat")


def small_config(family: str, *, kind: str = "plain", pattern: str = "LLLA", **over) -> ModelConfig:
    """5 heads of width 6 (GQA 5:1 where allowed), dim 30, vocab 37, odd conv widths/states;
    Mamba-2: 10 heads of 6 channels in 2 groups, d_state 5."""
    base = dict(
        family=family, vocab_size=37, dim=30, num_layers=3, num_heads=5, num_kv_heads=1,
        head_dim=6, ffn_dim=44, layer_pattern=pattern,
        mamba=MambaConfig(d_state=5, d_conv=3, expand=2, dt_rank=3, head_dim=6, n_groups=2),
        linear_attention=LinearAttentionConfig(kind=kind, conv_width=3, feature_dim=7),
    )
    base.update(over)
    return ModelConfig(**base)


@torch.no_grad()
def perturb(model: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """Move every weight away from its structured init (identity convs, gates near 1, ...) so
    every term of the recurrences matters; larger Δ so the scan mixes strongly over tokens."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
        if name.endswith(("dt_proj.bias", "dt_bias")):
            p.add_(2.0)
        if name.endswith("wg.bias"):
            p.sub_(6.0)  # gates σ(≈2) ≈ 0.88: a decay that visibly matters


def packed(lengths):
    """Document ids and per-document positions `(rows, seq)` of rows packed from documents of
    `lengths` (one list per row, equal sums)."""
    docs = torch.stack([torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls))
                        for ls in lengths])
    pos = torch.stack([torch.cat([torch.arange(n) for n in ls]) for ls in lengths])
    return docs, pos


def assert_packed_equals_alone(model, ids, labels, lengths):
    """On rows packed from documents of `lengths`, with per-document positions: every
    document's logits equal its logits alone (1e-10, float64), and the summed loss and its
    gradients equal the sums over documents (1e-6: the chunked cross-entropy sums in float32)."""
    docs, pos = packed(lengths)
    params = list(model.parameters())
    logits = model(ids, position_ids=pos, document_ids=docs)
    loss = model(ids, labels=labels, position_ids=pos, document_ids=docs, loss_reduction="sum")
    grads = torch.autograd.grad(loss, params, materialize_grads=True)
    ref_loss, ref_grads = 0.0, [torch.zeros_like(g) for g in grads]
    for b, lens in enumerate(lengths):
        start = 0
        for n in lens:
            sl = slice(start, start + n)
            alone = model(ids[b:b + 1, sl])
            assert (logits[b:b + 1, sl] - alone).abs().max() <= 1e-10
            doc_loss = model(ids[b:b + 1, sl], labels=labels[b:b + 1, sl], loss_reduction="sum")
            for acc, g in zip(ref_grads, torch.autograd.grad(doc_loss, params,
                                                          materialize_grads=True)):
                acc += g
            ref_loss += doc_loss.item()
            start += n
    assert abs(loss.item() - ref_loss) <= 1e-6 * abs(ref_loss)
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() <= 1e-6 * r.abs().max().clamp_min(1e-30)


# The test machines are small and shared: one intra-op thread avoids oversubscription stalls
# on these tiny shapes (the distributed harness does the same in its workers).
torch.set_num_threads(1)
