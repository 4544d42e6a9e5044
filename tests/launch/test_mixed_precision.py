"""FSDP2 mixed precision (`parallel.fsdp_param_dtype` / `fsdp_reduce_dtype`): the blocks compute
with bfloat16 weights while the optimizer keeps float32 shards, training follows the float32
run, and "auto" picks bfloat16 only where bf16 training runs on CUDA.

Tolerance: bfloat16 keeps 8 significant bits (relative rounding 2^-9 ~ 2e-3 per weight and
activation); over a 2-layer model the loss (~4.2) moves by ~1e-3 and the gradient norm by a few
percent, so the loss is held to 1e-2 and the norm to 10% relative; a gradient that is not
reduced (or reduced twice) moves the norm by ~40% (1/sqrt(2) or 2x on 2 ranks).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from ctxscale.dist.parallelize import fsdp_dtypes
from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train
from tests.harness import run_distributed
from tests.launch.test_train import SMALL, TINY

BASE = SMALL + ["train.steps=3", "checkpoint.every=0", "parallel.dp_shard=2"]
RUNS = {"float32": [], "bf16_params": ["parallel.fsdp_param_dtype=bfloat16"],
        "bf16_params_and_reduce": ["parallel.fsdp_param_dtype=bfloat16",
                                   "parallel.fsdp_reduce_dtype=bfloat16"]}


def _records(out: Path) -> dict[int, dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def _worker(rank, world_size, root):
    from torch.distributed.tensor import DTensor

    seen: dict[str, set] = {}

    def hook(module, args):
        if isinstance(module, torch.nn.Linear):
            seen.setdefault(run, set()).add(module.weight.dtype)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    shards = {}
    try:
        for run, extra in RUNS.items():
            cfg = load_job_config(TINY, BASE + extra + [f"train.output_dir={root}/{run}"])
            summary = train(cfg)
            assert summary["steps"] == 3
        # the float32 shards the optimizer updates, after a bf16 run (a fresh model)
        from ctxscale.launch.train import TrainState

        st = TrainState(load_job_config(TINY, BASE + RUNS["bf16_params"]
                                        + [f"train.output_dir={root}/probe"]))
        shards = {p.dtype for p in st.model.parameters()}
        assert all(isinstance(p, DTensor) for p in st.model.parameters())
        st.checkpointer.close()
    finally:
        handle.remove()
    return {k: sorted(map(str, v)) for k, v in seen.items()}, sorted(map(str, shards))


def test_bf16_params_compute_in_bf16_and_train_like_float32(tmp_path):
    for seen, shards in run_distributed(_worker, 2, args=(str(tmp_path),), timeout=400):
        assert seen["float32"] == ["torch.float32"]
        assert seen["bf16_params"] == seen["bf16_params_and_reduce"] == ["torch.bfloat16"]
        assert shards == ["torch.float32"]
    ref = _records(tmp_path / "float32")
    for run in ("bf16_params", "bf16_params_and_reduce"):
        got = _records(tmp_path / run)
        assert sorted(got) == [1, 2, 3]
        for step, r in ref.items():
            assert abs(got[step]["loss"] - r["loss"]) <= 1e-2, (run, step, got[step], r)
            assert abs(got[step]["grad_norm"] - r["grad_norm"]) <= 0.1 * r["grad_norm"], (
                run, step, got[step]["grad_norm"], r["grad_norm"])


@pytest.mark.parametrize("param, train_dtype, device, expected", [
    ("auto", "bfloat16", "cuda", torch.bfloat16),
    ("auto", "bfloat16", "cpu", torch.float32),  # CPU runs stay float32 (no autocast there)
    ("auto", "float32", "cuda", torch.float32),
    ("bfloat16", "float32", "cpu", torch.bfloat16),  # an explicit choice wins
    ("float32", "bfloat16", "cuda", torch.float32),
])
def test_auto_param_dtype(param, train_dtype, device, expected):
    par = SimpleNamespace(fsdp_param_dtype=param, fsdp_reduce_dtype="float32")
    assert fsdp_dtypes(par, train_dtype=train_dtype, device_type=device) == (expected,
                                                                              torch.float32)


def test_refusals_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="parallel.fsdp_param_dtype.*float16.*not allowed"):
        load_job_config(TINY, BASE + ["parallel.fsdp_param_dtype=float16"])
    with pytest.raises(ValueError, match="dp_engine=ddp; use dp_engine=fsdp"):
        load_job_config(TINY, BASE + ["parallel.fsdp_reduce_dtype=bfloat16",
                                      "parallel.dp_engine=ddp"])
    one_rank = load_job_config(TINY, SMALL + ["parallel.fsdp_param_dtype=bfloat16",
                                              f"train.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=r"does not apply \(one data-parallel rank"):
        train(one_rank)
