"""`PasskeyMix`: text batches with passkey retrieval rows mixed in (`convert.passkey_fraction`),
so that a small model being converted or pretrained learns to retrieve (`ctxscale convert`)."""

from __future__ import annotations

import numpy as np
import torch

from .synthetic import passkey_text_sample


class PasskeyMix:
    """Wraps a text DataSource: each row becomes, with probability `fraction`, a passkey example
    whose filler is the row's own tokens (labels: the whole next-token sequence). Deterministic in
    (seed, global row index); the row counter is the wrapped source's sample counter."""

    def __init__(self, source, *, fraction: float, seed: int):
        self.source, self.fraction, self.seed = source, fraction, seed
        self.tokenizer = getattr(source, "tokenizer", None)
        self.vocab_size = source.vocab_size

    def next_batch(self) -> dict:
        first = self.source.global_samples + self.source.dp_rank * self.source.batch_size
        batch = self.source.next_batch()
        if self.fraction <= 0:
            return batch
        ids, labels = batch["input_ids"].clone(), batch["labels"].clone()
        answers = torch.full_like(labels, -100)  # the passkey rows' answer tokens only
        for j in range(ids.shape[0]):
            rng = np.random.default_rng([self.seed, first + j])
            if rng.random() >= self.fraction:
                continue
            row = passkey_text_sample(self.tokenizer, ids[j].tolist(), ids.shape[1],
                                      float(rng.random()), rng)
            ids[j] = row["input_ids"]
            labels[j] = torch.cat([row["input_ids"][1:], torch.tensor(row["answer_ids"][-1:])])
            answers[j] = row["labels"]
        return {"input_ids": ids, "labels": labels, "answer_labels": answers}

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)
