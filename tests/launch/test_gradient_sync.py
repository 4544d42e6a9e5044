"""Gradient accumulation reduces once per step where it should: DDP never reduces before the
last micro-batch, FSDP not either with parallel.fsdp_reduce_every_microbatch=false (and every
micro-batch by default); the losses are those of reducing every micro-batch.

Observable: right after each micro-batch's backward, FSDP's sharded parameters have a gradient
only if it was reduce-scattered, and a DDP gradient is the same on both ranks only if it was
all-reduced (the two ranks' batches differ). Tolerance: the float32 sums are the same terms in
another order (~1e-7 on a loss of ~4), 1e-6."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import TrainState, train
from tests.harness import run_distributed
from tests.launch.test_train import SMALL, TINY, _losses

BASE = SMALL + ["train.steps=3", "train.grad_accum=3", "train.batch_size=2",
                "checkpoint.every=0"]
CASES = {"fsdp_every": ["parallel.dp_shard=2"],
         "fsdp_once": ["parallel.dp_shard=2", "parallel.fsdp_reduce_every_microbatch=false"],
         "ddp": ["parallel.dp_shard=2", "parallel.dp_engine=ddp"]}


def _synced_after_each_microbatch(st: TrainState) -> list[bool]:
    """Whether the gradients were reduced right after each micro-batch of the first step."""
    seen = []
    real = st.forward_backward

    def probe(*args, **kwargs):
        out = real(*args, **kwargs)
        params = [p for p in st.model.parameters() if p.requires_grad]
        if isinstance(st.model, torch.nn.parallel.DistributedDataParallel):
            g = torch.cat([p.grad.flatten() for p in params])
            other = g.clone()
            dist.broadcast(other, src=0)
            same = torch.tensor(float(torch.equal(g, other)))
            dist.all_reduce(same, op=dist.ReduceOp.MIN)
            seen.append(bool(same.item()))
        else:
            seen.append(all(p.grad is not None for p in params))
        return out

    st.forward_backward = probe
    st.train_step()
    return seen


def _worker(rank, world_size, root):
    out = {}
    for name, extra in CASES.items():
        probe = TrainState(load_job_config(TINY, BASE + extra
                                           + [f"train.output_dir={root}/probe_{name}"]))
        out[name] = _synced_after_each_microbatch(probe)
        probe.checkpointer.close()
        train(load_job_config(TINY, BASE + extra + [f"train.output_dir={root}/{name}"]))
    return out


def test_reduce_once_per_step_where_asked(tmp_path):
    for seen in run_distributed(_worker, 2, args=(str(tmp_path),), timeout=400):
        assert seen["fsdp_every"] == [True, True, True]
        assert seen["fsdp_once"] == [False, False, True]
        assert seen["ddp"] == [False, False, True]
    ref = _losses(Path(tmp_path) / "fsdp_every")
    assert sorted(ref) == [1, 2, 3]
    for name in ("fsdp_once", "ddp"):
        got = _losses(Path(tmp_path) / name)
        assert got.keys() == ref.keys()
        assert all(abs(got[s] - ref[s]) <= 1e-6 for s in ref), (name, got, ref)


def test_the_knob_is_typed():
    with pytest.raises(ValueError, match="fsdp_reduce_every_microbatch.*true or false"):
        load_job_config(TINY, BASE + ["parallel.fsdp_reduce_every_microbatch=sometimes"])
