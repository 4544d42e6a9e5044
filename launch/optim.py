"""AdamW with decoupled weight decay on matrices only; warmup, then cosine, linear, constant
or warmup-stable-decay (wsd) learning rates."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, cfg) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # norms, biases and embeddings are not decayed (Llama / nanoGPT practice)
        (decay if p.dim() >= 2 and "embeddings" not in name else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, schedule: str,
              min_lr_ratio: float, decay_fraction: float = 0.2) -> float:
    """Multiplier of the peak lr for 0-based `step`. `wsd` (warmup-stable-decay, Hu et al.
    2024, "MiniCPM"): the peak until the last `decay_fraction` of the steps, then a linear
    decay to min_lr_ratio at the last step (a run can be continued from before the decay)."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "wsd":
        decay = max(1, round(decay_fraction * (total_steps - warmup_steps)))
        start = total_steps - decay
        if step < start:
            return 1.0
        return 1.0 - (1.0 - min_lr_ratio) * min((step - start + 1) / decay, 1.0)
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def build_scheduler(optimizer, cfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, total_steps=total_steps, warmup_steps=cfg.warmup_steps,
                               schedule=cfg.schedule, min_lr_ratio=cfg.min_lr_ratio,
                               decay_fraction=cfg.decay_fraction),
    )
