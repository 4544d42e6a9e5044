"""LoRA: low-rank adapters on frozen linear layers (Hu et al., "LoRA: Low-Rank Adaptation of
Large Language Models", 2021), as LoLCATs uses them to fine-tune a linearized model.

    y = x Wᵀ + b + (alpha / rank) · (x Aᵀ) Bᵀ,      A: (rank, in), B: (out, rank)

A ~ Kaiming-uniform, B = 0, so an adapted model starts exactly equal to the base model. W and b
stay frozen. `merge_lora` folds W ← W + (alpha / rank) B A and puts plain `nn.Linear`s back, so
the merged model has the original parameter names (checkpoints and `save_hf` see no adapters).
Activations `(..., in_features)`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Linear, *, rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.rank, self.scaling = rank, alpha / rank
        w = base.weight
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    @property
    def weight(self):
        return self.base.weight

    @property
    def in_features(self):
        return self.base.in_features

    @property
    def out_features(self):
        return self.base.out_features

    def forward(self, x):
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        out = self.base
        out.weight.add_((self.lora_b @ self.lora_a) * self.scaling)
        return out


def apply_lora(model: nn.Module, *, rank: int, alpha: float, targets=("wq", "wk", "wv", "wo")) -> list[str]:
    """Wrap every `nn.Linear` whose attribute name is in `targets`; returns the wrapped names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in targets and isinstance(child, nn.Linear):
                setattr(module, child_name, LoRALinear(child, rank=rank, alpha=alpha))
                wrapped.append(f"{name}.{child_name}" if name else child_name)
    if not wrapped:
        raise ValueError(f"no nn.Linear named one of {list(targets)} found; fix lora targets")
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and restore plain `nn.Linear`s (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, child_name, child.merged())
    return model


def lora_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if n.endswith(("lora_a", "lora_b"))]


__all__ = ["LoRALinear", "apply_lora", "lora_parameter_names", "merge_lora"]
