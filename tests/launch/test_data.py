"""Data layer: config validation, synthetic tasks (MQAR, passkey), sampler sharding and resume,
accuracy metrics. Text data and tokenizer are tested in test_data_text.py."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from ctxscale.launch.data import (
    DataConfig,
    build_data,
    mqar_sample,
    passkey_accuracy,
    passkey_sample,
    passkey_text_eval_set,
    passkey_text_sample,
    sequence_accuracy,
    token_accuracy,
)
from ctxscale.launch.data.synthetic import (
    PASSKEY_FIRST_FILLER,
    PASSKEY_KEY_CLOSE,
    PASSKEY_KEY_OPEN,
    PASSKEY_QUERY,
    PASSKEY_TEXT_INTRO,
    PASSKEY_TEXT_NEEDLE_AFTER,
    PASSKEY_TEXT_NEEDLE_BEFORE,
    PASSKEY_TEXT_QUESTION,
)

# Odd, non-power-of-two sizes on purpose.
MQAR = DataConfig(kind="mqar", seq_len=78, vocab_size=70, num_kv_pairs=7, seed=3)
PASSKEY = DataConfig(kind="passkey", seq_len=61, passkey_digits=4, passkey_vocab_size=23, seed=5)
CONFIGS = {"mqar": MQAR, "passkey": PASSKEY}


def _take(src, n):
    return [src.next_batch() for _ in range(n)]


def _eq(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["labels"], y["labels"])
        for x, y in zip(a, b)
    )


# ---------------------------------------------------------------- config


def test_default_config_is_valid_and_builds():
    cfg = DataConfig()
    cfg.validate()
    src = build_data(cfg, batch_size=2, dp_rank=0, dp_size=1, seed=0)
    batch = src.next_batch()
    assert batch["input_ids"].shape == (2, cfg.seq_len) and batch["input_ids"].dtype == torch.long
    assert batch["labels"].shape == (2, cfg.seq_len) and batch["labels"].dtype == torch.long
    assert src.vocab_size == cfg.vocab_size


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(kind="images"), "kind"),
        (dict(seq_len=1), "seq_len"),
        (dict(num_kv_pairs=30, seq_len=100), "num_kv_pairs"),
        (dict(num_kv_pairs=0), "num_kv_pairs"),
        (dict(vocab_size=10, num_kv_pairs=5, seq_len=64), "num_kv_pairs"),
        (dict(mqar_power_a=0.0), "mqar_power_a"),
        (dict(kind="passkey", passkey_vocab_size=13), "passkey_vocab_size"),
        (dict(kind="passkey", passkey_digits=0), "passkey_digits"),
        (dict(kind="passkey", seq_len=9, passkey_digits=4), "seq_len"),
        (dict(kind="passkey", passkey_depth_max=1.5), "passkey_depth_max"),
        (dict(kind="passkey", passkey_depth_min=0.8, passkey_depth_max=0.2), "passkey_depth_min"),
        (dict(kind="text"), "text_files"),
        (dict(kind="text", text_files=["a.txt"], val_fraction=1.0), "val_fraction"),
        (dict(kind="text", text_files=["a.txt"], tokenizer_vocab_size=10), "tokenizer_vocab_size"),
        (dict(kind="text", text_files=["a.txt"], tokenizer_type="wordpiece"), "tokenizer_type"),
    ],
)
def test_bad_config_values_raise_naming_the_field(changes, field):
    cfg = replace(DataConfig(), **changes)
    with pytest.raises(ValueError, match=field):
        cfg.validate()
    with pytest.raises(ValueError, match=field):
        build_data(cfg, batch_size=1, dp_rank=0, dp_size=1, seed=0)


def test_bad_build_arguments_raise():
    with pytest.raises(ValueError, match="split"):
        build_data(MQAR, batch_size=1, dp_rank=0, dp_size=1, seed=0, split="test")
    with pytest.raises(ValueError, match="dp_rank"):
        build_data(MQAR, batch_size=1, dp_rank=2, dp_size=2, seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        build_data(MQAR, batch_size=0, dp_rank=0, dp_size=1, seed=0)


# ---------------------------------------------------------------- MQAR structure


@pytest.mark.parametrize("random_non_queries", [True, False])
@pytest.mark.parametrize("seq_len, n", [(78, 7), (64, 16), (29, 3)])
def test_mqar_structure(seq_len, n, random_non_queries):
    vocab = 70
    half = vocab // 2
    for i in range(20):
        rng = np.random.default_rng([11, i])
        x, y = mqar_sample(
            rng,
            seq_len=seq_len,
            vocab_size=vocab,
            num_kv_pairs=n,
            random_non_queries=random_non_queries,
        )
        assert x.shape == y.shape == (seq_len,) and x.dtype == y.dtype == np.int64
        assert x.min() >= 0 and x.max() < vocab
        keys, values = x[0 : 2 * n : 2], x[1 : 2 * n : 2]
        # keys and values from disjoint vocab halves, each distinct
        assert keys.min() >= 1 and keys.max() < half and len(set(keys.tolist())) == n
        assert values.min() >= half and values.max() < vocab and len(set(values.tolist())) == n
        pair = dict(zip(keys.tolist(), values.tolist()))
        labelled = np.flatnonzero(y != -100)
        # exactly one query per key, after the context, at even offsets from it
        assert len(labelled) == n
        assert labelled.min() >= 2 * n and np.all((labelled - 2 * n) % 2 == 0)
        assert sorted(x[labelled].tolist()) == sorted(keys.tolist())
        for t in labelled:  # target of each query = value paired with the queried key
            assert y[t] == pair[int(x[t])]
        if not random_non_queries:
            others = np.ones(seq_len, bool)
            others[: 2 * n] = False
            others[labelled] = False
            assert np.all(x[others] == 0)


def test_mqar_query_gaps_follow_power_law():
    """Gaps are drawn with p(g) ∝ g^(a-1): with a=0.01 small gaps dominate; a=1 is uniform."""
    seq_len, n = 512, 4
    space = (seq_len - 2 * n) // 2

    def mean_slot(a):
        slots = []
        for i in range(200):
            rng = np.random.default_rng([7, i])
            _, y = mqar_sample(rng, seq_len=seq_len, vocab_size=600, num_kv_pairs=n, power_a=a)
            slots += ((np.flatnonzero(y != -100) - 2 * n) // 2).tolist()
        return np.mean(slots)

    # uniform without replacement: mean slot (space-1)/2 = 125.5; std of the mean over 800
    # draws ~ 72/sqrt(800) ~ 2.6, so +-15 is > 5 sigma. Power law a=0.01: mean well below.
    assert abs(mean_slot(1.0) - (space - 1) / 2) < 15
    assert mean_slot(0.01) < 0.5 * (space - 1) / 2


# ---------------------------------------------------------------- passkey structure


@pytest.mark.parametrize("depth", [0.0, 0.37, 1.0])
def test_passkey_structure(depth):
    seq_len, m, vocab = 61, 4, 23
    for i in range(10):
        rng = np.random.default_rng([3, i])
        x, y, info = passkey_sample(
            rng, seq_len=seq_len, num_digits=m, depth=depth, vocab_size=vocab
        )
        assert x.shape == y.shape == (seq_len,)
        key = info["key"]
        assert key.shape == (m,) and key.min() >= 0 and key.max() <= 9
        num_filler = seq_len + 1 - (2 * m + 3)
        start = info["key_start"]
        assert start == round(depth * num_filler)  # depth respected
        assert x[start] == PASSKEY_KEY_OPEN and x[start + m + 1] == PASSKEY_KEY_CLOSE
        np.testing.assert_array_equal(x[start + 1 : start + 1 + m], key)
        # the question marker, then the answer; labels only on the answer = hidden key
        assert x[seq_len - m] == PASSKEY_QUERY
        np.testing.assert_array_equal(y[seq_len - m :], key)
        assert np.all(y[: seq_len - m] == -100)
        np.testing.assert_array_equal(x[seq_len - m + 1 :], key[:-1])  # teacher forcing
        filler = np.ones(seq_len, bool)
        filler[start : start + m + 2] = False
        filler[seq_len - m :] = False
        assert np.all(x[filler] >= PASSKEY_FIRST_FILLER) and np.all(x < vocab)


def test_passkey_source_depth_range():
    cfg = replace(PASSKEY, passkey_depth_min=0.5, passkey_depth_max=0.5)
    x = build_data(cfg, batch_size=6, dp_rank=0, dp_size=1, seed=1).next_batch()["input_ids"]
    num_filler = cfg.seq_len + 1 - (2 * cfg.passkey_digits + 3)
    assert torch.all(x[:, round(0.5 * num_filler)] == PASSKEY_KEY_OPEN)


class _CharTokenizer:
    """Stand-in tokenizer: one id per character (ids = ord)."""

    def encode(self, text):
        return [ord(c) for c in text]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_text_sample(depth):
    tok = _CharTokenizer()
    rng = np.random.default_rng(0)
    out = passkey_text_sample(tok, "The grass is green. ", 700, depth, rng)
    x, y = out["input_ids"], out["labels"]
    assert x.shape == y.shape == (700,) and x.dtype == torch.long
    answer = [ord(c) for c in out["passkey"]]
    assert out["answer_ids"] == answer and len(answer) == 5
    assert y[y != -100].tolist() == answer and y[-5:].tolist() == answer
    text = "".join(chr(i) for i in x.tolist())
    start = out["key_start"]
    assert text[start:].startswith("The pass key is" + out["passkey"])
    assert text.rstrip(out["passkey"][:-1]).endswith("The pass key is")
    # depth: the needle starts after round(depth * F) filler tokens, F = all filler tokens
    template = (
        len(PASSKEY_TEXT_INTRO)
        + len(PASSKEY_TEXT_NEEDLE_BEFORE)
        + len(PASSKEY_TEXT_NEEDLE_AFTER)
        + 1
    )
    template += len(PASSKEY_TEXT_QUESTION) + 3 * 5
    num_filler = 701 - template
    assert start == len(PASSKEY_TEXT_INTRO) + round(depth * num_filler)
    filler = ("The grass is green. " * 40)[:num_filler]
    before = round(depth * num_filler)
    assert text[: len(PASSKEY_TEXT_INTRO)] == PASSKEY_TEXT_INTRO
    assert text[len(PASSKEY_TEXT_INTRO) : start] == filler[:before]
    needle_end = start + template - len(PASSKEY_TEXT_INTRO) - len(PASSKEY_TEXT_QUESTION) - 5
    assert text[needle_end : needle_end + num_filler - before] == filler[before:]
    assert text[needle_end + num_filler - before :].startswith(PASSKEY_TEXT_QUESTION)
    with pytest.raises(ValueError, match="seq_len"):
        passkey_text_sample(tok, "x", 50, depth, rng)


def test_passkey_text_eval_set_fixed_depth_sweep():
    tok = _CharTokenizer()
    kw = dict(seq_len=400, depths=[0.0, 0.25, 1.0], samples_per_depth=3, seed=7)
    a = passkey_text_eval_set(tok, "Filler words here. ", **kw)
    b = passkey_text_eval_set(tok, [ord(c) for c in "Filler words here. "], **kw)
    assert [x["depth"] for x in a] == [0.0, 0.25, 1.0]
    for x, y in zip(a, b):
        assert torch.equal(x["input_ids"], y["input_ids"]) and x["passkeys"] == y["passkeys"]
        assert x["input_ids"].shape == x["labels"].shape == (3, 400)
        for row, key in zip(x["labels"], x["passkeys"]):
            assert row[row != -100].tolist() == [ord(c) for c in key]
    starts = [
        "".join(map(chr, x["input_ids"][0].tolist())).index(PASSKEY_TEXT_NEEDLE_BEFORE) for x in a
    ]
    assert starts[0] < starts[1] < starts[2]  # deeper needles sit later


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("kind", ["mqar", "passkey"])
def test_determinism_by_seed(kind):
    cfg = CONFIGS[kind]
    a = _take(build_data(cfg, batch_size=3, dp_rank=0, dp_size=1, seed=9), 3)
    b = _take(build_data(cfg, batch_size=3, dp_rank=0, dp_size=1, seed=9), 3)
    c = _take(build_data(cfg, batch_size=3, dp_rank=0, dp_size=1, seed=10), 3)
    assert _eq(a, b)
    assert not torch.equal(a[0]["input_ids"], c[0]["input_ids"])
    rows = torch.cat([x["input_ids"] for x in a])
    assert len({tuple(r.tolist()) for r in rows}) == rows.shape[0]  # samples differ


@pytest.mark.parametrize("kind", ["mqar", "passkey"])
@pytest.mark.parametrize("dp_size", [2, 3])
def test_dp_sharding_disjoint_and_covering(kind, dp_size):
    cfg, b, steps = CONFIGS[kind], 2, 3
    single = _take(build_data(cfg, batch_size=b * dp_size, dp_rank=0, dp_size=1, seed=4), steps)
    ranks = [
        _take(build_data(cfg, batch_size=b, dp_rank=r, dp_size=dp_size, seed=4), steps)
        for r in range(dp_size)
    ]
    for k in range(steps):
        for key in ("input_ids", "labels"):
            joined = torch.cat([ranks[r][k][key] for r in range(dp_size)])
            assert torch.equal(joined, single[k][key])
    all_rows = [tuple(x.tolist()) for r in ranks for bt in r for x in bt["input_ids"]]
    assert len(set(all_rows)) == len(all_rows) == dp_size * b * steps


@pytest.mark.parametrize("kind", ["mqar", "passkey"])
def test_exact_resume(kind):
    cfg, k = CONFIGS[kind], 3
    uninterrupted = _take(build_data(cfg, batch_size=2, dp_rank=1, dp_size=2, seed=6), k + 3)
    src = build_data(cfg, batch_size=2, dp_rank=1, dp_size=2, seed=6)
    _take(src, k)
    state = json.loads(json.dumps(src.state_dict()))  # must be JSON-serializable
    resumed = build_data(cfg, batch_size=2, dp_rank=1, dp_size=2, seed=6)
    resumed.load_state_dict(state)
    assert _eq(_take(resumed, 3), uninterrupted[k:])


def test_resume_with_other_dp_size_and_mismatch_errors():
    single = _take(build_data(MQAR, batch_size=4, dp_rank=0, dp_size=1, seed=2), 3)
    src = build_data(MQAR, batch_size=4, dp_rank=0, dp_size=1, seed=2)
    _take(src, 1)
    state = src.state_dict()
    halves = []
    for r in range(2):  # elastic: same global batch, split across two ranks
        s = build_data(MQAR, batch_size=2, dp_rank=r, dp_size=2, seed=2)
        s.load_state_dict(state)
        halves.append(_take(s, 2))
    for k in range(2):
        joined = torch.cat([halves[0][k]["input_ids"], halves[1][k]["input_ids"]])
        assert torch.equal(joined, single[k + 1]["input_ids"])
    with pytest.raises(ValueError, match="multiple of the global batch"):
        build_data(MQAR, batch_size=3, dp_rank=0, dp_size=1, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="run_seed"):
        build_data(MQAR, batch_size=4, dp_rank=0, dp_size=1, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        cfg = replace(MQAR, seq_len=80)
        build_data(cfg, batch_size=4, dp_rank=0, dp_size=1, seed=2).load_state_dict(state)


@pytest.mark.parametrize("kind", ["mqar", "passkey"])
def test_eval_batches_fixed(kind):
    cfg = CONFIGS[kind]
    src = build_data(cfg, batch_size=2, dp_rank=0, dp_size=1, seed=1)
    first = src.eval_batches(2)
    _take(src, 2)
    assert _eq(src.eval_batches(2), first)  # same on every call, independent of training
    other_run = build_data(cfg, batch_size=2, dp_rank=0, dp_size=1, seed=99)
    assert _eq(other_run.eval_batches(2), first)  # val set does not depend on the run seed
    train = torch.cat([b["input_ids"] for b in _take(other_run, 2)])
    val = torch.cat([b["input_ids"] for b in first])
    assert not any(torch.equal(t, v) for t in train for v in val)
    # dp-sharded eval covers the single-process eval set
    shards = [
        build_data(cfg, batch_size=1, dp_rank=r, dp_size=2, seed=1).eval_batches(2)
        for r in range(2)
    ]
    for k in range(2):
        assert torch.equal(
            torch.cat([shards[0][k]["labels"], shards[1][k]["labels"]]), first[k]["labels"]
        )


# ---------------------------------------------------------------- accuracy


def test_token_and_sequence_accuracy():
    labels = torch.tensor([[-100, 3, 1, -100], [2, -100, -100, 0], [-100, -100, -100, -100]])
    pred = torch.tensor([[0, 3, 1, 2], [2, 1, 1, 1], [0, 0, 0, 0]])
    logits = torch.nn.functional.one_hot(pred, 5).float() * 3.0 - 1.0
    assert token_accuracy(logits, labels) == (3, 4)  # row 0 both right, row 1 one of two
    assert sequence_accuracy(logits, labels) == (1, 2)  # row 2 has no labels: not counted
    assert passkey_accuracy(logits, labels) == {
        "correct": 1,
        "total": 2,
        "token_correct": 3,
        "token_total": 4,
    }
    assert token_accuracy(logits, torch.full_like(labels, -100)) == (0, 0)
    with pytest.raises(ValueError, match="labels"):
        token_accuracy(logits[:, :-1], labels)


def test_accuracy_on_synthetic_batch_with_oracle_logits():
    batch = build_data(MQAR, batch_size=3, dp_rank=0, dp_size=1, seed=0).next_batch()
    labels = batch["labels"]
    oracle = torch.nn.functional.one_hot(labels.clamp(min=0), MQAR.vocab_size).float()
    n = int((labels != -100).sum())
    assert n == 3 * MQAR.num_kv_pairs
    assert token_accuracy(oracle, labels) == (n, n)
    assert token_accuracy(-oracle, labels)[0] == 0
