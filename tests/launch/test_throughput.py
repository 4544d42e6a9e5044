"""Model TFLOP/s per device and MFU in metrics.jsonl and the run summary: the logged value is
flops_per_token(seq_len) x tokens/s / world size, MFU is its share of the device's peak, and
the peak comes from CTXSCALE_PEAK_TFLOPS or the bf16 table of known GPUs (never guessed)."""

from __future__ import annotations

import json

import pytest
import torch

from ctxscale.launch import metrics
from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import format_summary, train
from ctxscale.models import build_model
from tests.launch.test_train import SMALL, TINY

BASE = SMALL + ["train.steps=3", "checkpoint.every=0"]


@pytest.mark.parametrize("peak", [None, "0.5"])
def test_logged_tflops_and_mfu(peak, tmp_path, monkeypatch):
    if peak:
        monkeypatch.setenv(metrics.PEAK_ENV, peak)
    else:
        monkeypatch.delenv(metrics.PEAK_ENV, raising=False)
    cfg = load_job_config(TINY, BASE + [f"train.output_dir={tmp_path}"])
    summary = train(cfg)
    cfg.model.vocab_size = cfg.model.vocab_size or cfg.data.vocab_size
    per_token = build_model(cfg.model).flops_per_token(cfg.data.seq_len)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3
    for r in steps:
        assert r["tflops"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12, rel=1e-9)
        if peak:
            assert r["mfu"] == pytest.approx(100 * r["tflops"] / 0.5, rel=1e-9)
        else:
            assert "mfu" not in r  # CPU: no peak to divide by
    assert summary["tflops"] == pytest.approx(per_token * summary["tokens_per_s"] / 1e12)
    text = format_summary(summary, tmp_path)
    assert "TFLOP/s per device" in text and (("% MFU" in text) == bool(peak))


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756e12),
    ("NVIDIA H200", "bfloat16", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA L40", "bfloat16", 181e12),
    ("NVIDIA H200", "float32", None),  # no float32 peak is guessed
    ("Some Future GPU", "bfloat16", None),
])
def test_peak_table(name, dtype, expected, monkeypatch):
    monkeypatch.delenv(metrics.PEAK_ENV, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert metrics.device_peak_flops(torch.device("cuda", 0), dtype) == expected
    assert metrics.device_peak_flops(torch.device("cpu"), dtype) is None


def test_peak_override_must_be_a_number(monkeypatch):
    monkeypatch.setenv(metrics.PEAK_ENV, "fast")
    with pytest.raises(ValueError, match="CTXSCALE_PEAK_TFLOPS='fast' must be a number"):
        metrics.device_peak_flops(torch.device("cpu"), "float32")
