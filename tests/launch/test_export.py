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


def test_single_process_checkpoint_io_is_quiet(tmp_path):
    """Without a process group (convert, export, eval in one process), DCP warns on every save
    and load that it assumes one process, even when told so: the checkpoint helpers hush that
    warning only, and the round trip is exact."""
    import warnings

    import torch.distributed as dist

    from ctxscale.launch.convert import load_model, save_model
    from ctxscale.models import build_model

    assert not dist.is_initialized()
    torch.manual_seed(0)
    model = build_model(load_job_config(TINY, SMALL + ["model.vocab_size=64"]).model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        save_model(model, tmp_path / "model", rank=0)
        back = load_model(tmp_path / "model")
    mine, theirs = model.state_dict(), back.state_dict()
    assert sorted(mine) == sorted(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    # the filter does not outlive the call
    before = list(warnings.filters)
    save_model(model, tmp_path / "again", rank=0)
    assert warnings.filters == before
