"""`eval` on a LoLCATs-windowed model: the ablation rows linear_only / window_only / no_attention
appear in the table, results.json and the plot (one curve per row), each equal to the same model evaluated
with its layers' `hybrid_mode` set by hand (the same float32 computation: exact), and the model is
left in mode "both"; models without a window get no extra rows."""

import json
from pathlib import Path

import pytest
import torch

from ctxscale.launch.convert import save_model
from ctxscale.launch.evaluate import (
    EvalJob,
    evaluate_models,
    markdown_table,
    model_variants,
    perplexity,
    windowed_layers,
)
from ctxscale.models import build_model
from ctxscale.models.config import ModelConfig

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
ROWS = ["win", "win/linear_only", "win/window_only", "win/no_attention", "plain"]


def _model(window):
    torch.manual_seed(0)
    cfg = ModelConfig(family="hybrid", layer_pattern="LA", vocab_size=384, dim=32, num_layers=2,
                      num_heads=2)
    cfg.linear_attention.kind = "hedgehog"
    cfg.linear_attention.rope = True
    cfg.linear_attention.window = window
    return build_model(cfg)


def test_model_variants_switch_and_restore_modes():
    model = _model(4)
    ids = torch.randint(0, 384, (2, 19))
    batches = [{"input_ids": ids, "labels": ids}]
    seen = {}
    for row, m in model_variants(model, "win"):
        seen[row] = perplexity(m, batches)
        assert {layer.hybrid_mode for layer in windowed_layers(m)} == {
            {"win": "both", "win/no_attention": "none"}.get(row, row.split("/")[-1])}
    assert list(seen) == ROWS[:4]
    assert len(set(seen.values())) == 4  # every ablation changes the model
    assert [layer.hybrid_mode for layer in windowed_layers(model)] == ["both"]
    layer = windowed_layers(model)[0]
    layer.hybrid_mode = "window_only"
    assert perplexity(model, batches) == seen["win/window_only"]
    assert [r for r, _ in model_variants(_model(0), "plain")] == ["plain"]


@pytest.mark.skipif(not TEXT.is_file(), reason=f"{TEXT} not found")
def test_evaluate_adds_ablation_rows(tmp_path):
    save_model(_model(4), tmp_path / "win", rank=0)
    save_model(_model(0), tmp_path / "plain", rank=0)
    job = EvalJob(models=[str(tmp_path / "win"), str(tmp_path / "plain")], labels=["win", "plain"],
                  batch_size=2, eval_batches=1, passkey_lengths=[192], passkey_depths=[0.5],
                  passkey_samples=1, output_dir=str(tmp_path / "out"))
    job.data.text_files = [str(TEXT)]
    job.data.tokenizer_vocab_size = 384
    job.data.seq_len = 64
    job.data.cache_dir = str(tmp_path / "cache")
    res = evaluate_models(job)
    assert list(res) == ROWS
    assert all(192 in r["passkey"] for r in res.values())
    assert len({res[r]["perplexity"] for r in ROWS[:4]}) == 4
    out = tmp_path / "out"
    assert list(json.loads((out / "results.json").read_text())) == ROWS
    table = (out / "results.md").read_text()
    assert table.startswith(markdown_table(res) + "\n")
    assert all(f"| {r} |" in table for r in ROWS)
    assert (out / "passkey.png").stat().st_size > 1000
