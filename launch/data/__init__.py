"""ctxscale data layer: synthetic long-context tasks (MQAR, passkey) and packed text.

Usage::

    from ctxscale.launch.data import DataConfig, build_data, token_accuracy

    data = build_data(cfg, batch_size=8, dp_rank=rank, dp_size=world, seed=run_seed)
    model_vocab = data.vocab_size
    batch = data.next_batch()  # {"input_ids", "labels"}: (8, cfg.seq_len) int64
    correct, total = token_accuracy(logits, batch["labels"])
"""

from __future__ import annotations

from .build import build_data
from .config import DataConfig
from .metrics import sequence_accuracy, token_accuracy
from .source import DataSource
from .synthetic import (
    mqar_accuracy,
    mqar_sample,
    passkey_accuracy,
    passkey_sample,
    passkey_text_eval_set,
    passkey_text_sample,
)

__all__ = [
    "DataConfig",
    "DataSource",
    "build_data",
    "mqar_accuracy",
    "mqar_sample",
    "passkey_accuracy",
    "passkey_sample",
    "passkey_text_eval_set",
    "passkey_text_sample",
    "sequence_accuracy",
    "token_accuracy",
]
