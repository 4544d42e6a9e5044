"""Export a training run's checkpoint to one safetensors file and to a Hugging Face folder."""

import os

import torch

from ctxscale.launch.config import load_job_config
from ctxscale.launch.export import _full_model, export_checkpoint
from ctxscale.launch.train import train
from tests.launch.test_train import SMALL, TINY


def test_export_to_safetensors_and_hf_folder(tmp_path):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from ctxscale.models import load_hf

    run = tmp_path / "run"
    train(load_job_config(TINY, SMALL + ["train.steps=3", f"train.output_dir={run}",
                                         "checkpoint.at_end=true"]))
    written = export_checkpoint(run, safetensors_path=tmp_path / "model.safetensors",
                                hf_dir=tmp_path / "hf")
    assert set(written) == {"safetensors", "hf"}
    model = _full_model(run).eval()
    flat = load_file(str(tmp_path / "model.safetensors"))
    for name, w in model.state_dict().items():
        if name in flat:
            assert torch.equal(flat[name], w), name
    ids = torch.randint(0, model.cfg.vocab_size, (2, 29))
    with torch.no_grad():
        ours = model(ids)
        reloaded = load_hf(tmp_path / "hf").eval()(ids)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()(ids).logits
    # the same weights through two implementations: float32 rounding only
    assert (reloaded - ours).abs().max() <= 1e-5
    assert (hf - ours).abs().max() <= 1e-4


def test_export_hybrid_linear_run_to_hf_folder(tmp_path):
    """A hybrid (linear + softmax) training run exports through save_hf's `ctxscale` block and
    loads back with load_hf as the same model: the same float32 tensors, so exact logits."""
    from ctxscale.models import load_hf

    run = tmp_path / "run"
    train(load_job_config(TINY, SMALL + [
        "train.steps=2", f"train.output_dir={run}", "checkpoint.at_end=true",
        "model.family=hybrid", "model.layer_pattern=LA", "model.linear_attention.kind=hedgehog"]))
    export_checkpoint(run, hf_dir=tmp_path / "hf")
    model = _full_model(run).eval()
    back = load_hf(tmp_path / "hf").eval()
    assert back.codes == "LA" and back.cfg.linear_attention.kind == "hedgehog"
    ids = torch.randint(0, model.cfg.vocab_size, (2, 29))
    with torch.no_grad():
        assert (back(ids) - model(ids)).abs().max() <= 1e-6
