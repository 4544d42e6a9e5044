"""`mpirun -n 4` with Open MPI runs a tiny training job to the end (rank/size from mpi4py)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _mpi_unavailable() -> str | None:
    if shutil.which("mpirun") is None:
        return "mpirun not installed; run `make sysdeps` (Debian's openmpi-bin, libopenmpi-dev)"
    probe = subprocess.run([sys.executable, "-c", "from mpi4py import MPI"], capture_output=True)
    if probe.returncode != 0:
        return "mpi4py cannot load an MPI library: " + probe.stderr.decode()[-300:]
    return None


def test_mpirun_four_ranks_trains_to_the_end(tmp_path):
    reason = _mpi_unavailable()
    if reason:
        print(f"skipping the MPI test: {reason}")
        pytest.skip(reason)
    out_dir = tmp_path / "run"
    cmd = ["mpirun", "-n", "4", "--oversubscribe", "--bind-to", "none"]
    if os.geteuid() == 0:
        cmd.append("--allow-run-as-root")
    cmd += ["-x", "OMP_NUM_THREADS=1", sys.executable, "-m", "ctxscale.launch.train",
            "--config", str(ROOT / "configs" / "tiny.yaml"), "train.steps=3",
            f"train.output_dir={out_dir}", "train.progress=false", "train.eval_every=0",
            "checkpoint.resume=none", "model.dim=32", "data.seq_len=64", "train.batch_size=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "world 4 (mpi)" in res.stdout
    records = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]
