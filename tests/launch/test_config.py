"""Config loading: typed sections, dotted overrides, errors that name the key, file and fix."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctxscale.launch.config import ConfigError, load_job_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"


def test_tiny_config_loads_with_overrides():
    cfg = load_job_config(TINY, ["train.steps=20", "model.num_layers=3", "optim.betas=[0.8,0.9]",
                                 "model.rope_scaling.type=linear", "model.rope_scaling.factor=2"])
    assert cfg.train.steps == 20 and cfg.model.num_layers == 3
    assert cfg.optim.betas == [0.8, 0.9]
    assert cfg.model.rope_scaling.type == "linear" and cfg.model.rope_scaling.factor == 2.0
    assert isinstance(cfg.model.rope_scaling.factor, float)


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"train": {"stpes": 3}}))
    with pytest.raises(ConfigError) as e:
        load_job_config(p)
    msg = str(e.value)
    assert "train.stpes" in msg and str(p) in msg and "did you mean steps" in msg


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.steps=ten", r"train.steps .* must be an integer"),
        ("train.steps=1.5", r"must be an integer"),
        ("train.progress=maybe", r"must be true or false"),
        ("parallel.cp_method=spiral", r"choose one of \['rsa', 'ring', 'lightseq', 'ulysses', 'usp'\]"),
        ("parallel.cp_state_method=tree", r"choose one of \['allgather', 'ring'\]"),
        ("model.num_heads=0", r"model.num_heads must be positive"),
        ("model.num_kv_heads=3", r"multiple of\s+model.num_kv_heads=3"),
        ("parallel.cp=3", r"data.seq_len=64 .* multiple of 3"),
        ("nosuchsection.x=1", r"unknown config key 'nosuchsection'"),
        ("train.steps", r"must look like key.path=value"),
        # tp splits the Titans memory heads
        ("model.family=titans model.titans.memory_heads=3 parallel.tp=2",
         r"memory_heads=3 must be divisible by parallel.tp=2"),
        ("model.family=mamba model.dim=36 model.num_heads=6 model.mamba.expand=1 parallel.tp=8",
         r"expand x model.dim = 1 x 36 = 36 must be divisible by parallel.tp=8"),
    ],
)
def test_bad_values_rejected_before_work(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_job_config(TINY, override.split())


def test_zigzag_needs_twice_the_ranks():
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_job_config(TINY, ["parallel.cp=4", "parallel.cp_layout=zigzag", "data.seq_len=100"])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job_config(bad)


def test_cli_print_config_and_error_exit_code():
    out = subprocess.run(
        [sys.executable, "-m", "ctxscale.launch.cli", "train", "--config", str(TINY),
         "--print-config", "train.steps=7"],
        capture_output=True, text=True, check=True,
    ).stdout
    assert yaml.safe_load(out)["train"]["steps"] == 7
    bad = subprocess.run(
        [sys.executable, "-m", "ctxscale.launch.cli", "train", "--config", str(TINY),
         "train.bogus=1"],
        capture_output=True, text=True,
    )
    assert bad.returncode == 2 and "unknown config key 'train.bogus'" in bad.stderr


def test_cp_state_method_reaches_the_parallel_context():
    from ctxscale.dist.mesh import ParallelDims
    from ctxscale.dist.parallelize import parallel_context

    cfg = load_job_config(TINY, ["parallel.cp=2", "parallel.cp_state_method=ring"])
    assert cfg.parallel.cp_state_method == "ring"
    assert load_job_config(TINY, ["parallel.cp=2"]).parallel.cp_state_method == "allgather"
    dims = ParallelDims.from_config(cfg.parallel, world_size=2)
    ctx = parallel_context(dims, None, cfg.parallel)
    assert ctx.cp_state_method == "ring"
