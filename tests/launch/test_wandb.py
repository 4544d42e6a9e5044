"""train.wandb: the records of metrics.jsonl go to Weights & Biases too (a stand-in module here:
the package is optional and the test machine has no network), under one run id that a resumed
job reuses, with the resolved config; a missing package is refused at config time."""

from __future__ import annotations

import json
import sys
import types

import pytest

from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train
from tests.launch.test_train import SMALL, TINY

BASE = SMALL + ["train.wandb=true", "train.wandb_project=ctx-tests", "checkpoint.every=2",
                "checkpoint.resume=auto"]


class _Run:
    def __init__(self, calls, kwargs):
        self.calls, self.kwargs = calls, kwargs
        calls.append(("init", kwargs))

    def log(self, data, step):
        self.calls.append(("log", step, dict(data)))

    def finish(self):
        self.calls.append(("finish",))


@pytest.fixture()
def fake_wandb(monkeypatch):
    calls = []
    module = types.ModuleType("wandb")
    module.init = lambda **kw: _Run(calls, kw)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_records_reach_wandb_and_a_resume_reuses_the_run(fake_wandb, tmp_path):
    out = tmp_path / "run"
    train(load_job_config(TINY, BASE + ["train.steps=2", f"train.output_dir={out}"]))
    init = fake_wandb[0][1]
    assert init["project"] == "ctx-tests" and init["name"] == "run"
    assert init["resume"] == "allow" and init["dir"] == str(out)
    assert init["config"]["train"]["steps"] == 2 and init["config"]["model"]["dim"] == 32
    logged = {c[1]: c[2] for c in fake_wandb if c[0] == "log" and "loss" in c[2]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in (r for r in rows if "loss" in r):
        assert logged[r["step"]]["loss"] == r["loss"]
        assert logged[r["step"]]["tokens_per_s"] == r["tokens_per_s"]
    assert fake_wandb[-1] == ("finish",)
    run_id = init["id"]
    assert (out / "wandb_run_id").read_text().strip() == run_id
    fake_wandb.clear()
    train(load_job_config(TINY, BASE + ["train.steps=4", f"train.output_dir={out}"]))
    assert fake_wandb[0][1]["id"] == run_id  # the resumed job continues the same W&B run
    assert sorted({c[1] for c in fake_wandb if c[0] == "log" and "loss" in c[2]}) == [3, 4]


def test_missing_package_is_refused_at_config_time(monkeypatch):
    import importlib.util

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ValueError, match="train.wandb=true needs the wandb package"):
        load_job_config(TINY, BASE)
