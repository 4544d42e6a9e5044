"""`eval`: perplexity, passkey curve and MQAR accuracy against hand-computed values and oracle
models (a model that copies the answer scores 1, a constant model scores 0), plus the written
table, JSON and plot."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from ctxscale.launch.convert import save_model
from ctxscale.launch.evaluate import (
    EvalJob,
    evaluate_models,
    loss_by_position,
    markdown_table,
    mqar_eval,
    passkey_curve,
    perplexity,
)
from ctxscale.models import build_model
from ctxscale.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


class Oracle(nn.Module):
    """Logits that put all mass on `answers[b, t]` (the next token), or on token 0."""

    def __init__(self, vocab, answers=None):
        super().__init__()
        self.vocab, self.answers = vocab, answers

    def forward(self, ids, labels=None, loss_reduction="mean"):
        b, s = ids.shape
        logits = torch.zeros(b, s, self.vocab)
        if self.answers is not None:
            logits.scatter_(2, self.answers(ids).unsqueeze(-1), 10.0)
        if labels is None:
            return logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                           reduction=loss_reduction, ignore_index=-100)


def test_perplexity_uniform_model_is_vocab_size():
    batches = [{"input_ids": torch.zeros(2, 7, dtype=torch.long),
                "labels": torch.tensor([[1, 2, -100, 3, 4, 5, 6]] * 2)}]
    assert perplexity(Oracle(11), batches) == pytest.approx(11.0, rel=1e-6)


@pytest.mark.skipif(not TEXT.is_file(), reason=f"{TEXT} not found")
def test_perplexity_with_document_mask_uses_the_documents(tmp_path):
    """With data.document_mask the batches' document ids and positions reach the model: the
    perplexity is that of the masked forward, not of the plain one."""
    from ctxscale.launch.data import DataConfig, build_data

    data = DataConfig(kind="text", text_files=[str(TEXT)], tokenizer_vocab_size=384, seq_len=96,
                      cache_dir=str(tmp_path / "cache"), document_mask=True, doc_separator="\n\n")
    batches = build_data(data, batch_size=2, dp_rank=0, dp_size=1, seed=0,
                         split="val").eval_batches(2)
    assert all(int(b["document_ids"].amax()) > 0 for b in batches)  # windows hold several
    torch.manual_seed(0)
    model = build_model(ModelConfig(family="mamba2", vocab_size=384, dim=32, num_layers=1))
    with torch.no_grad():
        masked = sum(float(model(b["input_ids"], labels=b["labels"], loss_reduction="sum",
                                 document_ids=b["document_ids"], position_ids=b["position_ids"]))
                     for b in batches)
        b = batches[0]
        logits_plain = model(b["input_ids"])
        logits_masked = model(b["input_ids"], document_ids=b["document_ids"],
                              position_ids=b["position_ids"])
    count = sum(int((b["labels"] != -100).sum()) for b in batches)
    assert perplexity(model, batches) == pytest.approx(math.exp(masked / count), rel=1e-6)
    assert (logits_masked - logits_plain).abs().max() > 1e-3  # the documents matter


def test_mqar_oracle_and_constant():
    from ctxscale.launch.data import mqar_sample

    vocab, seq, pairs = 64, 32, 4
    table = {}
    for i in range(6):
        ids, labels = mqar_sample(np.random.default_rng([0, i]), seq_len=seq, vocab_size=vocab,
                                  num_kv_pairs=pairs)
        table[tuple(ids.tolist())] = torch.from_numpy(np.where(labels < 0, 0, labels))
    perfect = Oracle(vocab, lambda ids: torch.stack([table[tuple(r.tolist())] for r in ids]))
    assert mqar_eval(perfect, vocab_size=vocab, seq_len=seq, num_kv_pairs=pairs, samples=6) == 1.0
    assert mqar_eval(Oracle(vocab), vocab_size=vocab, seq_len=seq, num_kv_pairs=pairs,
                     samples=6) == 0.0


class _Tok:
    """Characters as ids: digits 0-9 -> 0-9, everything else by ord % 50 + 10."""

    def encode(self, text):
        return [int(c) if c.isdigit() else ord(c) % 50 + 10 for c in text]


def test_passkey_curve_oracle_copies_the_key():
    tok = _Tok()
    filler = tok.encode("the quick brown fox jumps over the lazy dog ") * 5
    from ctxscale.launch.data.synthetic import passkey_text_eval_set

    def answers(ids):
        # look the key up: rebuild the eval set and map each row to its shifted full sequence
        out = torch.zeros_like(ids)
        for s in sets:
            for row, lab in zip(s["input_ids"], s["labels"]):
                for b in range(ids.shape[0]):
                    if torch.equal(ids[b], row):
                        out[b] = torch.where(lab < 0, 0, lab)
        return out

    sets = [x for L in (260, 300) for x in passkey_text_eval_set(tok, filler, seq_len=L,
                                                               depths=[0.0, 0.5, 1.0],
                                                               samples_per_depth=2)]
    curve = passkey_curve(Oracle(60, answers), tok, filler, lengths=[260, 300],
                          depths=[0.0, 0.5, 1.0], samples=2)
    assert set(curve) == {260, 300}
    assert all(c["accuracy"] == 1.0 and set(c["by_depth"].values()) == {1.0} for c in curve.values())
    zero = passkey_curve(Oracle(60), tok, filler, lengths=[260], depths=[0.5], samples=2)
    assert zero[260]["accuracy"] == 0.0


@pytest.mark.skipif(not TEXT.is_file(), reason=f"{TEXT} not found")
def test_evaluate_models_writes_table_and_plot(tmp_path):
    torch.manual_seed(0)
    cfg_model = ModelConfig(family="linear", vocab_size=384, dim=32, num_layers=1, num_heads=2)
    cfg_model.linear_attention.kind = "lawcat"
    model = build_model(cfg_model)
    save_model(model, tmp_path / "m", rank=0)
    job = EvalJob(models=[str(tmp_path / "m")], labels=["lawcat"], batch_size=2, eval_batches=2,
                  passkey_lengths=[192, 384], passkey_depths=[0.5], passkey_samples=2,
                  mqar_samples=4, mqar_seq_len=32, output_dir=str(tmp_path / "out"))
    job.data.text_files = [str(TEXT)]
    job.data.tokenizer_vocab_size = 384
    job.data.seq_len = 64
    job.data.cache_dir = str(tmp_path / "cache")
    job.validate()
    res = evaluate_models(job)
    r = res["lawcat"]
    # an untrained model: perplexity close to uniform over the vocabulary
    assert 0.5 * 384 < r["perplexity"] < 2 * 384 and math.isfinite(r["perplexity"])
    assert set(r["passkey"]) == {192, 384} and 0.0 <= r["mqar"] <= 1.0
    out = tmp_path / "out"
    assert json.loads((out / "results.json").read_text())["lawcat"]["perplexity"] == pytest.approx(
        r["perplexity"])
    table = (out / "results.md").read_text()
    assert table.startswith("| model | perplexity | MQAR | passkey@192 | passkey@384 |")
    assert table.startswith(markdown_table(res) + "\n")
    assert "loss by position (tokens of context)" in table and "| 32-63 |" in table
    assert (out / "passkey.png").stat().st_size > 1000
    assert (out / "loss_by_position.png").stat().st_size > 1000


@torch.no_grad()
def _manual_buckets(model, batches, positions):
    """Per-token losses from the full logits, averaged by hand over log2 position buckets."""
    sums, counts = {}, {}
    for batch, pos in zip(batches, positions):
        logits = model(batch["input_ids"], **{k: batch[k] for k in ("document_ids",
                                                                     "position_ids") if k in batch})
        ce = nn.functional.cross_entropy(logits.double().flatten(0, 1),
                                         batch["labels"].flatten(), reduction="none",
                                         ignore_index=-100).view(batch["labels"].shape)
        for (i, j), lab in np.ndenumerate(batch["labels"].numpy()):
            if lab == -100:
                continue
            k = int(math.floor(math.log2(int(pos[i, j]) + 1)))
            sums[k] = sums.get(k, 0.0) + float(ce[i, j])
            counts[k] = counts.get(k, 0) + 1
    return sums, counts


@pytest.mark.parametrize("document_mask", [False, True])
def test_loss_by_position_matches_a_hand_count(document_mask):
    """Buckets [1], [2-3], [4-7], ... of 1-based positions (per document with the mask, from
    the batch's position_ids): the same means and token counts as a per-token count over the
    full logits, float64 reference, 1e-5 (float32 logits); their token-weighted mean is the
    perplexity's log."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, dim=16, num_layers=1, num_heads=2))
    rng = np.random.default_rng(0)
    batches, positions = [], []
    for _ in range(2):
        ids = torch.from_numpy(rng.integers(0, 50, (2, 37)))
        labels = ids.roll(-1, 1).clone()
        labels[:, -1] = -100
        labels[0, 5] = -100
        batch = {"input_ids": ids, "labels": labels}
        pos = torch.arange(37).expand(2, 37)
        if document_mask:
            docs = torch.tensor([[0] * 20 + [1] * 17, [0] * 9 + [1] * 28])
            starts = torch.tensor([[0] * 20 + [20] * 17, [0] * 9 + [9] * 28])
            pos = torch.arange(37).expand(2, 37) - starts
            batch |= {"document_ids": docs, "position_ids": pos}
        batches.append(batch)
        positions.append(pos)
    got = loss_by_position(model, batches)
    sums, counts = _manual_buckets(model, batches, positions)
    assert got["start"] == [2**k for k in sorted(sums)] == [1, 2, 4, 8, 16, 32][:len(sums)]
    assert got["end"] == [2 ** (k + 1) - 1 for k in sorted(sums)]
    assert got["tokens"] == [counts[k] for k in sorted(sums)]
    assert got["loss"] == pytest.approx([sums[k] / counts[k] for k in sorted(sums)], rel=1e-5)
    mean = sum(lo * n for lo, n in zip(got["loss"], got["tokens"])) / sum(got["tokens"])
    assert math.exp(mean) == pytest.approx(perplexity(model, batches), rel=1e-5)
