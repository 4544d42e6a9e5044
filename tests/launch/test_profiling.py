"""`profile.*`: a torch.profiler trace of exactly the chosen steps on every rank, the operators
table, allocations with profile.memory, nothing after a resume past the window, and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train
from tests.harness import run_distributed
from tests.launch.test_train import SMALL, TINY

BASE = SMALL + ["checkpoint.every=0", "checkpoint.at_end=false"]


def _steps_in(trace: Path) -> list[int]:
    events = json.loads(trace.read_text())["traceEvents"]
    names = {e.get("name", "") for e in events}
    return sorted(int(n.split()[-1]) for n in names if n.startswith("ctxscale.step "))


def _run(out, extra, rank=0):
    train(load_job_config(TINY, BASE + extra + [f"train.output_dir={out}"]))
    return sorted(p.name for p in (Path(out) / "profile").glob(f"rank{rank}_*"))


def test_trace_holds_exactly_the_window(tmp_path):
    files = _run(tmp_path, ["train.steps=5", "profile.enabled=true", "profile.start_step=2",
                            "profile.steps=2", "profile.memory=true",
                            "profile.record_shapes=true"])
    assert files == ["rank0_ops.txt", "rank0_steps2-3.json"]
    trace = tmp_path / "profile" / "rank0_steps2-3.json"
    assert _steps_in(trace) == [2, 3]
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "[memory]" for e in events), "profile.memory: no allocations"
    assert any(e.get("name", "").startswith("aten::mm") for e in events)
    ops = (tmp_path / "profile" / "rank0_ops.txt").read_text()
    assert "Self CPU" in ops and "aten::" in ops


def test_a_run_ending_inside_the_window_writes_what_it_recorded(tmp_path):
    files = _run(tmp_path, ["train.steps=3", "profile.enabled=true", "profile.start_step=3",
                            "profile.steps=4"])
    assert files == ["rank0_ops.txt", "rank0_steps3-3.json"]
    assert _steps_in(tmp_path / "profile" / "rank0_steps3-3.json") == [3]


def test_resume_past_the_window_profiles_nothing(tmp_path, capsys):
    first = ["train.steps=3", "checkpoint.at_end=true", "checkpoint.resume=auto"]
    train(load_job_config(TINY, BASE + first + [f"train.output_dir={tmp_path}"]))
    train(load_job_config(TINY, BASE + ["train.steps=5", "checkpoint.resume=auto",
                                        "profile.enabled=true", "profile.start_step=2",
                                        f"train.output_dir={tmp_path}"]))
    assert not (tmp_path / "profile").exists()
    assert "profile: steps 2-3 were run before this resume (at step 3)" in capsys.readouterr().out


def _cp_run(rank, world_size, root):
    return _run(root, ["train.steps=3", "parallel.cp=2", "profile.enabled=true",
                       "profile.start_step=2", "profile.steps=1"], rank)


def test_every_rank_writes_its_trace(tmp_path):
    results = run_distributed(_cp_run, 2, args=(str(tmp_path),), timeout=300)
    for rank, files in enumerate(results):
        assert files == [f"rank{rank}_ops.txt", f"rank{rank}_steps2-2.json"]
        assert _steps_in(tmp_path / "profile" / f"rank{rank}_steps2-2.json") == [2]


@pytest.mark.parametrize("change, message", [
    (["profile.start_step=9"], r"profile.start_step=9 is past train.steps=4.*lower"),
    (["profile.steps=0"], r"profile.start_step=3 and profile.steps=0 must both be >= 1"),
    (["profile.enable=true"], r"profile.enable"),
])
def test_refusals(change, message):
    with pytest.raises(ValueError, match=message):
        load_job_config(TINY, BASE + ["train.steps=4", "profile.enabled=true"] + change)
