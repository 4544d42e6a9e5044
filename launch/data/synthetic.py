"""Synthetic long-context tasks: multi-query associative recall (MQAR) and passkey retrieval.

Every generator builds ONE sample from a `numpy.random.Generator`; the data source seeds that
generator from (seed, sample index), so a sample never depends on which batch, rank or process
produced it. Outputs are `input_ids` and `labels`, both `(seq_len,)` int64, with labels already
shifted (`labels[t]` is the target for position t) and -100 where no loss is taken.

MQAR — Arora, Eyuboglu et al. 2023, "Zoology: Measuring and Improving Recall in Efficient
Language Models", the `multiquery_ar` task. With V = vocab_size, n = num_kv_pairs, L = seq_len:
  * keys: n distinct tokens from [1, V/2); values: n distinct tokens from [V/2, V);
  * positions 0..2n-1 hold k_1 v_1 k_2 v_2 ... k_n v_n;
  * the rest is split into S = (L - 2n) // 2 two-token slots; n distinct slots s_i ∈ [0, S)
    are drawn without replacement with p(s) ∝ a · (s+1)^(a-1) (power law, a = power_a; a=1 is
    uniform), so queries cluster close to the context as repeated bigrams do in real text;
  * key k_i is placed at position 2n + 2·s_i and labels[that position] = v_i (the model must
    emit the paired value next); every other label is -100. Zoology requires an even L; an
    odd L works the same, its last position is never a query;
  * with random_non_queries, all remaining (zero) input positions get uniform random tokens
    from [0, V) — Zoology's default.
  Accuracy is the per-token accuracy over the labelled positions (Zoology's metric).

Passkey retrieval — Mohtashami & Jaggi 2023, "Landmark Attention" (the passkey test). Token
space, for training and evaluation from scratch: ids 0-9 are the digits, 10 = KEY_OPEN,
11 = KEY_CLOSE, 12 = QUERY, ids 13..vocab_size-1 are filler. The full sequence of L+1 tokens is
  filler[:a] KEY_OPEN d_1..d_m KEY_CLOSE filler[a:] QUERY d_1..d_m
with a = round(depth · F), F = number of filler tokens; input_ids = full[:-1],
labels = full[1:] masked to the last m positions (the answer digits). The text variant
`passkey_text_sample` does the same with a sentencepiece/HF tokenizer and natural filler text.
A sample counts as correct only if all m answer tokens are right; per-token accuracy is
reported too.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from .metrics import sequence_accuracy, token_accuracy

IGNORE_INDEX = -100

# Token-space passkey vocabulary.
PASSKEY_KEY_OPEN = 10
PASSKEY_KEY_CLOSE = 11
PASSKEY_QUERY = 12
PASSKEY_FIRST_FILLER = 13


@functools.lru_cache(maxsize=64)
def _power_law(space: int, power_a: float) -> np.ndarray:
    """p(s) ∝ a · (s+1)^(a-1) for slot s = 0..space-1, normalized (Zoology's query gaps)."""
    g = np.arange(1, space + 1, dtype=np.float64)
    p = power_a * g ** (power_a - 1.0)
    return p / p.sum()


def mqar_sample(
    rng: np.random.Generator,
    *,
    seq_len: int,
    vocab_size: int,
    num_kv_pairs: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """One MQAR sample -> (input_ids (seq_len,), labels (seq_len,)) int64. See module docstring."""
    n = num_kv_pairs
    if 4 * n > seq_len:
        raise ValueError(f"mqar needs seq_len >= 4 * num_kv_pairs = {4 * n}; got {seq_len}")
    half = vocab_size // 2
    if n > min(half - 1, vocab_size - half):
        raise ValueError(f"num_kv_pairs={n} exceeds the distinct keys of vocab_size={vocab_size}")
    keys = rng.choice(np.arange(1, half), size=n, replace=False)
    values = rng.choice(np.arange(half, vocab_size), size=n, replace=False)
    context = 2 * n
    space = (seq_len - context) // 2
    gaps = rng.choice(space, size=n, replace=False, p=_power_law(space, float(power_a)))

    input_ids = np.zeros(seq_len, dtype=np.int64)
    input_ids[0:context:2] = keys
    input_ids[1:context:2] = values
    query_pos = context + 2 * gaps
    input_ids[query_pos] = keys
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    labels[query_pos] = values
    if random_non_queries:
        noise = rng.integers(0, vocab_size, size=seq_len)
        zero = input_ids == 0
        input_ids[zero] = noise[zero]
    return input_ids, labels


def passkey_sample(
    rng: np.random.Generator,
    *,
    seq_len: int,
    num_digits: int,
    depth: float,
    vocab_size: int,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One token-space passkey sample.

    Returns (input_ids (seq_len,), labels (seq_len,), info) with info = {"key": digits (m,),
    "key_start": index in input_ids of KEY_OPEN, "depth": depth}.
    """
    m = num_digits
    num_filler = seq_len + 1 - (m + 2) - (1 + m)
    if num_filler < 0:
        raise ValueError(f"passkey with {m} digits needs seq_len >= {2 * m + 2}; got {seq_len}")
    if vocab_size <= PASSKEY_FIRST_FILLER:
        raise ValueError(
            f"passkey needs vocab_size >= {PASSKEY_FIRST_FILLER + 1}; got {vocab_size}"
        )
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth={depth} must be in [0, 1]")
    key = rng.integers(0, 10, size=m)
    filler = rng.integers(PASSKEY_FIRST_FILLER, vocab_size, size=num_filler)
    before = int(round(depth * num_filler))
    full = np.concatenate(
        [
            filler[:before],
            [PASSKEY_KEY_OPEN],
            key,
            [PASSKEY_KEY_CLOSE],
            filler[before:],
            [PASSKEY_QUERY],
            key,
        ]
    ).astype(np.int64)
    assert full.shape == (seq_len + 1,)
    labels = np.full(seq_len, IGNORE_INDEX, dtype=np.int64)
    labels[seq_len - m :] = full[seq_len + 1 - m :]
    return full[:-1].copy(), labels, {"key": key, "key_start": before, "depth": depth}


# Natural-language template for the text passkey test (after Mohtashami & Jaggi 2023).
PASSKEY_TEXT_INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
PASSKEY_TEXT_NEEDLE_BEFORE = "The pass key is"
PASSKEY_TEXT_NEEDLE_AFTER = ". Remember it. The pass key is"
PASSKEY_TEXT_QUESTION = "What is the pass key? The pass key is"


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without special tokens (sentencepiece, our Tokenizer, or HF)."""
    try:
        ids = tokenizer.encode(text, add_special_tokens=False)  # Hugging Face tokenizers
    except TypeError:
        ids = tokenizer.encode(text)  # sentencepiece / ctxscale Tokenizer
    return [int(i) for i in ids]


def passkey_text_sample(
    tokenizer,
    filler_text,
    seq_len: int,
    depth: float,
    rng: np.random.Generator,
    *,
    num_digits: int = 5,
    bos_id: int | None = None,
) -> dict:
    """Passkey retrieval in natural language, for pretrained / converted models.

    tokenizer: anything with `encode(str) -> list[int]` (sentencepiece processor, ctxscale
        `Tokenizer`, Hugging Face tokenizer). filler_text: a string, or its token ids already
        encoded (faster when called many times); it is repeated cyclically as needed.
    The key's digits are tokenized once and inserted verbatim both in the needle and as the
    answer, so the labelled answer tokens are exactly the hidden key's tokens.
    Returns {"input_ids": LongTensor (seq_len,), "labels": LongTensor (seq_len,) with only the
    answer tokens labelled, "passkey": str, "answer_ids": list[int], "key_start": token index
    where the needle starts, "depth": depth}.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"passkey depth={depth} must be in [0, 1]")
    passkey = "".join(str(d) for d in rng.integers(0, 10, size=num_digits))
    answer = _encode(tokenizer, passkey)
    intro = ([bos_id] if bos_id is not None else []) + _encode(tokenizer, PASSKEY_TEXT_INTRO)
    needle = (
        _encode(tokenizer, PASSKEY_TEXT_NEEDLE_BEFORE)
        + answer
        + _encode(tokenizer, PASSKEY_TEXT_NEEDLE_AFTER)
        + answer
        + _encode(tokenizer, ".")
    )
    question = _encode(tokenizer, PASSKEY_TEXT_QUESTION)
    filler = _encode(tokenizer, filler_text) if isinstance(filler_text, str) else list(filler_text)
    num_filler = seq_len + 1 - len(intro) - len(needle) - len(question) - len(answer)
    if num_filler < 0:
        raise ValueError(
            f"seq_len={seq_len} is too short for the passkey template "
            f"({seq_len + 1 - num_filler} tokens); raise seq_len"
        )
    if num_filler > 0 and not filler:
        raise ValueError("filler_text is empty; pass some text to hide the pass key in")
    reps = -(-num_filler // max(len(filler), 1))
    filler_ids = (filler * reps)[:num_filler]
    before = int(round(depth * num_filler))
    full = intro + filler_ids[:before] + needle + filler_ids[before:] + question + answer
    assert len(full) == seq_len + 1
    full_t = torch.tensor(full, dtype=torch.long)
    labels = torch.full((seq_len,), IGNORE_INDEX, dtype=torch.long)
    labels[seq_len - len(answer) :] = full_t[seq_len + 1 - len(answer) :]
    return {
        "input_ids": full_t[:-1].clone(),
        "labels": labels,
        "passkey": passkey,
        "answer_ids": answer,
        "key_start": len(intro) + before,
        "depth": depth,
    }


def passkey_text_eval_set(
    tokenizer,
    filler_text,
    *,
    seq_len: int,
    depths: list[float],
    samples_per_depth: int,
    seed: int = 0,
    num_digits: int = 5,
    bos_id: int | None = None,
) -> list[dict]:
    """A fixed passkey sweep over depths: one batch per depth, deterministic in `seed`.

    Returns [{"depth": d, "input_ids": (samples_per_depth, seq_len), "labels": (same),
    "passkeys": [str, ...]}] in the order of `depths`; sample j of depth index i is drawn
    from default_rng([seed, i, j]), so the set does not depend on how it is batched.
    """
    filler = _encode(tokenizer, filler_text) if isinstance(filler_text, str) else list(filler_text)
    out = []
    for i, depth in enumerate(depths):
        rows = [
            passkey_text_sample(
                tokenizer,
                filler,
                seq_len,
                float(depth),
                np.random.default_rng([seed, i, j]),
                num_digits=num_digits,
                bos_id=bos_id,
            )
            for j in range(samples_per_depth)
        ]
        out.append(
            {
                "depth": float(depth),
                "input_ids": torch.stack([r["input_ids"] for r in rows]),
                "labels": torch.stack([r["labels"] for r in rows]),
                "passkeys": [r["passkey"] for r in rows],
            }
        )
    return out


def mqar_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    """MQAR accuracy as in Zoology: (correct, total) over the labelled (query) positions."""
    return token_accuracy(logits, labels)


def passkey_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """Passkey accuracy counts: a sample is correct only if all its answer tokens are right.

    Returns {"correct": samples fully right, "total": samples with answer tokens,
    "token_correct": answer tokens right, "token_total": answer tokens}.
    """
    correct, total = sequence_accuracy(logits, labels)
    token_correct, token_total = token_accuracy(logits, labels)
    return {
        "correct": correct,
        "total": total,
        "token_correct": token_correct,
        "token_total": token_total,
    }
