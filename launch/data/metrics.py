"""Accuracy over labelled positions.

logits: (..., vocab) — any leading shape, e.g. (batch, seq, vocab); labels: the same leading
shape, int64, with -100 at positions that are not scored. A position is correct when
argmax(logits) equals its label. Only the labelled rows are arg-maxed, so this stays cheap on
long sequences where few positions carry labels (MQAR, passkey).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree: logits must "
            "be labels.shape + (vocab,); labels are already shifted (labels[t] targets position t)"
        )


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) over positions with labels != -100, prediction = argmax over vocab."""
    _check(logits, labels)
    mask = labels != IGNORE_INDEX
    total = int(mask.sum())
    if total == 0:
        return 0, 0
    pred = logits[mask].argmax(dim=-1)
    return int((pred == labels[mask]).sum()), total


def sequence_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """(correct, total) over samples (first dim) that have at least one label; a sample is
    correct when every labelled position in it is right. logits (batch, ..., vocab)."""
    _check(logits, labels)
    labels2 = labels.reshape(labels.shape[0], -1)
    logits2 = logits.reshape(labels.shape[0], -1, logits.shape[-1])
    mask = labels2 != IGNORE_INDEX
    wrong = torch.zeros_like(mask)
    if mask.any():
        wrong[mask] = logits2[mask].argmax(dim=-1) != labels2[mask]
    has_label = mask.any(dim=1)
    correct = has_label & ~wrong.any(dim=1)
    return int(correct.sum()), int(has_label.sum())
