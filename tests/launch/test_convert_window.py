"""`convert` with a LoLCATs window and Hedgehog-after-RoPE: the student config carries window and
rope (on by default for hedgehog), attention transfer trains the new mix λ with the CE on the
hybrid's own weights, and the windowed conversion under cp = 2 gives the losses of one process
(float32 sums in another order, Adam over 6 steps: 1e-4, as in tests/launch/test_convert.py)."""

import pytest
import torch

from ctxscale.launch.convert import convert, load_convert_config, load_model, save_model
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


WINDOWED = ["convert.student.kind=hedgehog", "convert.student.window=5", "run.batch_size=4"]


def test_windowed_hedgehog_student_trains_its_mix(tmp_path, teacher_dir):
    s = convert(_mqar_cfg(tmp_path / "w", teacher_dir, *WINDOWED, "convert.transfer.loss=both"))
    assert len(_losses(tmp_path / "w")) == 6
    model = load_model(s["model_dir"])
    la = model.cfg.linear_attention
    assert (la.kind, la.window, la.rope) == ("hedgehog", 5, True)
    for name in ("0", "1"):  # λ started at exp(0) = 1 and moved in transfer / fine-tune
        assert model.layers[name].attention.linear_mix.abs().max() > 0


def test_rope_default_per_kind_and_override(tmp_path, teacher_dir):
    off = convert(_mqar_cfg(tmp_path / "off", teacher_dir, *WINDOWED, "convert.student.rope=false",
                            "convert.transfer.steps=0", "convert.finetune.steps=0"))
    assert load_model(off["model_dir"]).cfg.linear_attention.rope is False
    law = convert(_mqar_cfg(tmp_path / "law", teacher_dir, "convert.transfer.steps=0",
                            "convert.finetune.steps=0"))
    assert load_model(law["model_dir"]).cfg.linear_attention.rope is False
    with pytest.raises(ValueError, match="window"):
        load_convert_config(None, ["convert.teacher=x", "convert.student.window=-1"]).validate()


def _cp_convert(rank, world_size, out, teacher_dir, overrides):
    return convert(_mqar_cfg(out, teacher_dir, *overrides))["eval_loss"]


def test_windowed_convert_cp2_equals_one_process(tmp_path, teacher_dir):
    extra = WINDOWED + ["convert.transfer.loss=mse"]
    one = convert(_mqar_cfg(tmp_path / "one", teacher_dir, *extra))
    ref = _losses(tmp_path / "one")
    evals = run_distributed(_cp_convert, 2, args=(str(tmp_path / "cp"), str(teacher_dir),
                                                  extra + ["parallel.cp=2"]))
    torch.testing.assert_close(_losses(tmp_path / "cp"), ref, rtol=1e-4, atol=1e-5)
    assert evals[0] == evals[1] and evals[0] == pytest.approx(one["eval_loss"], rel=1e-4)
