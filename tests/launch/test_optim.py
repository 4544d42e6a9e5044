"""launch/optim.py: the learning-rate schedules step by step, the parameter groups, and the
config refusals."""

import math

import pytest
import torch

from ctxscale.launch.config import OptimConfig
from ctxscale.launch.optim import build_optimizer, build_scheduler, lr_factor


def _curve(schedule, total=20, warmup=4, **kw):
    return [lr_factor(s, total_steps=total, warmup_steps=warmup, schedule=schedule,
                      min_lr_ratio=0.1, **kw) for s in range(total)]


def test_warmup_then_each_schedule():
    for schedule in ("cosine", "linear", "constant", "wsd"):
        assert _curve(schedule)[:4] == [0.25, 0.5, 0.75, 1.0], schedule
    assert _curve("constant")[4:] == [1.0] * 16
    linear = _curve("linear")
    assert linear[4] == 1.0 and math.isclose(linear[-1], 0.1 + 0.9 * (1 - 15 / 16))
    cosine = _curve("cosine")
    assert cosine[4] == 1.0 and all(a >= b for a, b in zip(cosine[4:], cosine[5:]))
    assert math.isclose(cosine[12], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_wsd_holds_the_peak_then_decays_to_the_floor_at_the_last_step():
    wsd = _curve("wsd", decay_fraction=0.25)  # 16 steps after warmup: the last 4 decay
    assert wsd[4:16] == [1.0] * 12
    assert [round(x, 6) for x in wsd[16:]] == [0.775, 0.55, 0.325, 0.1]
    short = _curve("wsd", total=5, warmup=0, decay_fraction=0.01)  # at least one decay step
    assert short[:4] == [1.0] * 4 and math.isclose(short[4], 0.1)


def test_scheduler_drives_the_optimizer_and_groups_skip_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    cfg = OptimConfig(lr=0.5, warmup_steps=2, schedule="wsd", decay_fraction=0.5)
    opt = build_optimizer(model, cfg)
    assert [len(g["params"]) for g in opt.param_groups] == [1, 3]  # the weight matrix only
    assert opt.param_groups[1]["weight_decay"] == 0.0
    sched = build_scheduler(opt, cfg, total_steps=6)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [round(x, 6) for x in lrs] == [0.25, 0.5, 0.5, 0.5, 0.275, 0.05]


@pytest.mark.parametrize("change, message", [
    (dict(decay_fraction=0.0), r"optim.decay_fraction=0.0 must be in \(0, 1\]"),
    (dict(lr=0.0), "optim.lr must be > 0"),
    (dict(betas=[0.9]), "optim.betas must be two numbers"),
])
def test_refusals(change, message):
    with pytest.raises(ValueError, match=message):
        OptimConfig(**change).validate()
