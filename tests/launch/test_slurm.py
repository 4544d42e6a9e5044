"""A real Slurm job: start a one-node cluster, sbatch the project's script on 2 tasks, check it."""

import json
import sys
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import LocalSlurm, unavailable_reason

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        print(f"skipping the Slurm test: {reason}")
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2)
    cluster.start()
    yield cluster
    cluster.stop()


def test_sbatch_training_job_on_two_tasks(slurm, tmp_path):
    out_dir = tmp_path / "run"
    log = tmp_path / "job-%j.out"
    job = slurm.submit(
        str(ROOT / "slurm" / "train.sbatch"),
        "--config", str(ROOT / "configs" / "tiny.yaml"), "train.steps=4",
        f"train.output_dir={out_dir}", "train.progress=false", "train.eval_every=0",
        "checkpoint.resume=none", "model.dim=32", "data.seq_len=64",
        cwd=str(ROOT), sbatch_args=(f"--output={log}", "--ntasks-per-node=2"),
        extra_env={"PYTHON": sys.executable},
    )
    state = slurm.wait(job, timeout=600)
    text = Path(str(log).replace("%j", job)).read_text()
    assert state["JobState"] == "COMPLETED", f"{state}\n{text}\n{slurm.logs()}"
    assert state["ExitCode"] == "0:0"
    assert "world 2 (slurm)" in text and "ctxscale run summary" in text
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert (out_dir / "checkpoints" / "step_00000004" / "meta.json").is_file()
