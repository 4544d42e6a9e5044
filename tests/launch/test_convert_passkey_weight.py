"""`convert.passkey_answer_weight`: the passkey rows' answer tokens get an extra weight w in the
LM loss, loss = Σ_labelled CE + w · Σ_answers CE (one forward pass, two chunked CEs over the same
hidden states). Oracle: the full-logits cross-entropy of the same model on the same batch.
Also: the answer labels are exactly the final answer tokens of the passkey rows (and nothing in
text rows), and bad settings (including a seq_len that does not split over cp) are refused
with a message naming the fix.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ctxscale.launch.config_loader import ConfigError
from ctxscale.launch.convert import Converter, load_convert_config

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
pytestmark = pytest.mark.skipif(not TEXT.is_file(), reason=f"{TEXT} not found")


def _cfg(tmp_path, *extra):
    return load_convert_config(None, [
        "model.dim=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
        "data.kind=text", f"data.text_files=[{TEXT}]", "data.tokenizer_vocab_size=384",
        "data.seq_len=192", f"data.cache_dir={tmp_path / 'cache'}", "run.batch_size=6",
        "run.device=cpu", "run.tensorboard=false", f"run.output_dir={tmp_path / 'out'}",
        "convert.init=scratch", "convert.student.kind=softmax", "convert.transfer.steps=0",
        "convert.finetune.method=full", "checkpoint.every=0", *extra,
    ])


def test_weighted_loss_equals_full_logits_oracle(tmp_path):
    w = 7.0
    job = Converter(_cfg(tmp_path, "convert.passkey_fraction=0.5",
                         f"convert.passkey_answer_weight={w}"))
    batch = job.data.next_batch()
    ids, labels, answers = batch["input_ids"], batch["labels"], batch["answer_labels"]
    rows = (answers != -100).any(1)
    assert 0 < int(rows.sum()) < ids.shape[0]  # both kinds of rows in this batch
    for j in range(ids.shape[0]):
        a = (answers[j] != -100).nonzero().flatten()
        if not rows[j]:
            continue
        # the answer is the last tokens of the row, and the LM labels agree there
        assert a.tolist() == list(range(ids.shape[1] - len(a), ids.shape[1]))
        assert torch.equal(answers[j, a], labels[j, a])
    model = job.student
    loss, _ = job.lm_loss(model, batch)
    with torch.no_grad():
        logits = model(ids).double().flatten(0, 1)
    ref = (F.cross_entropy(logits, labels.flatten(), reduction="sum")
           + w * F.cross_entropy(logits, answers.flatten(), reduction="sum"))
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)
    loss.backward()  # one graph, gradients reach the embeddings
    assert model.tok_embeddings.weight.grad.abs().sum() > 0


def test_zero_weight_is_the_plain_lm_loss(tmp_path):
    job = Converter(_cfg(tmp_path, "convert.passkey_fraction=0.5"))
    batch = job.data.next_batch()
    loss, _ = job.lm_loss(job.student, batch)
    with torch.no_grad():
        logits = job.student(batch["input_ids"]).double().flatten(0, 1)
    ref = F.cross_entropy(logits, batch["labels"].flatten(), reduction="sum")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("extra,match", [
    (["convert.passkey_answer_weight=-1", "convert.passkey_fraction=0.5"], "must be >= 0"),
    (["convert.passkey_answer_weight=5"], "raise the fraction"),
    # the seq_len check is shared with train jobs (ParallelConfig.check_seq_len)
    (["parallel.cp=4", "parallel.cp_layout=zigzag", "data.seq_len=100"],
     r"data.seq_len=100 cannot be split over parallel.cp=4 ranks with layout 'zigzag': it must "
     r"be a multiple of 8"),
])
def test_bad_settings_are_refused(tmp_path, extra, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, *extra)
