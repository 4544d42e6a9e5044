"""Training on real text: tinyshakespeare with a sentencepiece tokenizer trained on the fly."""

import json
from pathlib import Path

import pytest

from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train

ROOT = Path(__file__).resolve().parents[2]
TEXT = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"


@pytest.mark.skipif(not TEXT.is_file(), reason=f"{TEXT} not found (shared data beside the repo)")
def test_validation_loss_falls_40_percent(tmp_path):
    cfg = load_job_config(ROOT / "configs" / "shakespeare.yaml", [
        f"data.text_files=[{TEXT}]", f"train.output_dir={tmp_path}", "train.steps=80",
        "train.eval_every=40", "train.eval_batches=4", "train.progress=false",
        "train.tensorboard=false", "checkpoint.every=0", "checkpoint.at_end=false",
        "checkpoint.resume=none",
    ])
    summary = train(cfg)
    evals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in evals if "eval_loss" in r]
    initial, final = evals[0], evals[-1]
    assert initial == pytest.approx(summary["initial_eval_loss"])
    assert final <= 0.6 * initial, f"eval loss {initial:.3f} -> {final:.3f}: fell less than 40%"
