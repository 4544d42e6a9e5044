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


# The test machines are small and shared: one intra-op thread avoids oversubscription stalls
# on these tiny shapes (the distributed harness does the same in its workers).
torch.set_num_threads(1)
