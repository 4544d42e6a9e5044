"""`convert` at cp = 2 with the attention-transfer CE (`convert.transfer.loss=ce` and `both`): the
per-layer transfer losses, the fine-tune losses and the final eval loss equal one process with the
whole sequence (the CE runs `attention_transfer_ce_cp`, models/linearize.py). A gated LAWCAT
student (conv halo + global cumulative decay) and a windowed Hedgehog student (window k gathered,
RoPE). float32 sums in another order differ by ~1e-6 relative per step; Adam over 6 steps can
amplify that, so 1e-4, as in tests/launch/test_convert.py::test_convert_dp2_and_cp2_equal_one_process.
"""

import json
from pathlib import Path

import pytest
import torch

from ctxscale.launch.convert import convert, load_convert_config, save_model
from ctxscale.models.config import ModelConfig
from ctxscale.models.transformer import Transformer
from tests.harness import run_distributed
from tests.launch.test_convert import _losses, _mqar_cfg


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    teacher = Transformer(ModelConfig(vocab_size=64, dim=40, num_layers=2, num_heads=5,
                                      num_kv_heads=1, head_dim=8, init_std=0.1))
    path = tmp_path_factory.mktemp("teacher")
    save_model(teacher, path, rank=0)
    return path


def _layer_losses(out):
    recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [[r[f"transfer/layer{i}"] for i in (0, 1)] for r in recs if r.get("stage") == "transfer"]


def _cp_convert(rank, world_size, out, teacher_dir, overrides):
    return convert(_mqar_cfg(out, teacher_dir, *overrides))["eval_loss"]


@pytest.mark.parametrize("loss,student", [
    ("ce", ["convert.student.kind=lawcat"]),
    ("both", ["convert.student.kind=lawcat"]),
    ("both", ["convert.student.kind=hedgehog", "convert.student.window=5"]),
])
def test_ce_transfer_cp2_equals_one_process(tmp_path, teacher_dir, loss, student):
    extra = student + [f"convert.transfer.loss={loss}", "convert.transfer.tile=7",
                       "run.batch_size=4"]
    one = convert(_mqar_cfg(tmp_path / "one", teacher_dir, *extra))
    ref, ref_layers = _losses(tmp_path / "one"), _layer_losses(tmp_path / "one")
    assert len(ref) == 6 and len(ref_layers) == 3
    evals = run_distributed(_cp_convert, 2, args=(str(tmp_path / "cp"), str(teacher_dir),
                                                  extra + ["parallel.cp=2"]))
    torch.testing.assert_close(_layer_losses(tmp_path / "cp"), ref_layers, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(_losses(tmp_path / "cp"), ref, rtol=1e-4, atol=1e-5)
    assert evals[0] == evals[1] and evals[0] == pytest.approx(one["eval_loss"], rel=1e-4)


def test_ce_under_cp_needs_contiguous_layout():
    with pytest.raises(ValueError, match="cp_layout=contiguous"):  # load validates
        load_convert_config(None, ["convert.teacher=x", "parallel.cp=2",
                                   "parallel.cp_layout=zigzag", "convert.transfer.loss=ce"])
    for ok in (["parallel.cp_layout=contiguous", "convert.transfer.loss=ce"],
               ["parallel.cp_layout=zigzag", "convert.transfer.loss=mse"]):
        load_convert_config(None, ["convert.teacher=x", "parallel.cp=2", *ok]).validate()
