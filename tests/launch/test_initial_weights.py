"""`checkpoint.init_from`: a run starts from another run's weights (a DCP checkpoint or its run
folder, a Hugging Face folder, an exported .safetensors file), resharded to its own layout
(FSDP, tp, pp) with a longer context; only the weights come over (step 0, empty optimizer);
a restarted run resumes from its own checkpoint instead; wrong sources are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctxscale.launch.config import load_job_config
from ctxscale.launch.export import _full_model, export_checkpoint
from ctxscale.launch.train import train
from tests.harness import run_distributed
from tests.launch.test_train import SMALL, TINY, _losses

BASE = SMALL + ["checkpoint.every=0"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A 3-step run A, its exported safetensors and its Hugging Face folder."""
    root = tmp_path_factory.mktemp("init_from")
    run = root / "A"
    train(load_job_config(TINY, BASE + ["train.steps=3", "checkpoint.at_end=true",
                                        f"train.output_dir={run}"]))
    export_checkpoint(run, safetensors_path=root / "A.safetensors", hf_dir=root / "A_hf")
    weights = {k: v.clone() for k, v in _full_model(run).state_dict().items()}
    return root, weights


def _sources(root: Path) -> dict[str, str]:
    return {"run folder": str(root / "A"),
            "checkpoint": str(root / "A" / "checkpoints" / "step_00000003"),
            "safetensors": str(root / "A.safetensors"), "hf": str(root / "A_hf")}


LAYOUTS = {"fsdp2": ["parallel.dp_shard=2"], "tp2": ["parallel.tp=2"],
           "pp2": ["parallel.pp=2", "parallel.pp_microbatches=2"]}


def _worker(rank, world_size, root, layout):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from ctxscale.launch.train import TrainState

    out = {}
    for name, spec in _sources(Path(root)).items():
        cfg = load_job_config(TINY, BASE + LAYOUTS[layout] + [
            "train.steps=2", "data.seq_len=96", "model.rope_scaling.type=linear",
            "model.rope_scaling.factor=2.0", f"checkpoint.init_from={spec}",
            f"train.output_dir={root}/B_{layout}_{name.replace(' ', '_')}"])
        st = TrainState(cfg)
        full = get_model_state_dict(st.model, options=StateDictOptions(full_state_dict=True))
        out[name] = ({k: v.detach().clone() for k, v in full.items()}, st.step,
                     len(st.optimizer.state), st.initialized_from)
        st.checkpointer.close()
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_weights_arrive_resharded_under_every_layout(layout, source):
    root, weights = source
    for per_source in run_distributed(_worker, 2, args=(str(root), layout), timeout=400):
        for name, (full, step, optim_entries, described) in per_source.items():
            assert step == 0 and optim_entries == 0, name  # model only
            assert described, name
            assert full, name
            if layout != "pp2":
                assert sorted(full) == sorted(weights), name
            for k, v in full.items():  # a pipeline stage holds its own layers
                assert torch.equal(v, weights[k]), (name, k)


def test_a_restarted_run_resumes_from_its_own_checkpoint(source, tmp_path, capsys):
    root, _ = source
    init = [f"checkpoint.init_from={root / 'A'}", "checkpoint.every=1", "checkpoint.resume=auto"]
    whole = tmp_path / "whole"
    train(load_job_config(TINY, BASE + init + ["train.steps=4", f"train.output_dir={whole}"]))
    assert "weights from" in capsys.readouterr().out
    split = tmp_path / "split"
    train(load_job_config(TINY, BASE + init + ["train.steps=2", f"train.output_dir={split}"]))
    capsys.readouterr()
    train(load_job_config(TINY, BASE + init + ["train.steps=4", f"train.output_dir={split}"]))
    header = capsys.readouterr().out
    assert "resumed from" in header and "weights from" not in header
    assert _losses(split) == _losses(whole)


def test_init_from_a_different_model_or_a_bad_source_is_refused(source, tmp_path):
    root, _ = source

    def run(spec, extra=()):
        train(load_job_config(TINY, BASE + list(extra) + [
            "train.steps=1", f"checkpoint.init_from={spec}", f"train.output_dir={tmp_path}/r"]))

    for spec in (root / "A", root / "A.safetensors", root / "A_hf"):
        with pytest.raises(ValueError, match=r"holds a different model: .*layers\.2\."):
            run(spec, ["model.num_layers=3"])
    with pytest.raises(FileNotFoundError, match="init_from='/nowhere' does not exist"):
        run("/nowhere")
    pickled = tmp_path / "w.pt"
    torch.save({}, pickled)
    with pytest.raises(ValueError, match="pickled weights are never loaded"):
        run(pickled)
    empty = tmp_path / "empty_run"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no weights"):
        run(empty)
    corrupt = tmp_path / "c.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        run(corrupt)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()  # nothing trained or written
    assert json.loads((root / "A" / "checkpoints" / "step_00000003" / "meta.json")
                      .read_text())["step"] == 3  # the source is only read
