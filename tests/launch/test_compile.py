"""`train.compile`: every block is compiled (Inductor on CPU), trains exactly like eager, and
the graphs break only at the kernel entry points (`kernels.dispatch.eager`), which run eagerly:
with context parallelism too.

Tolerance 1e-5 on losses ~4: Inductor may reorder float32 reductions (the norms, the MLP), which
moves a loss by ~1e-7 per step; any real difference (a dropped mask, a wrong norm) is 1e-2.
"""

from pathlib import Path

import pytest
import torch

from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train
from tests.harness import run_distributed
from tests.launch.test_train import SMALL, TINY, _losses

BASE = SMALL + ["train.steps=4", "checkpoint.every=0", "checkpoint.at_end=false"]
TOL = 1e-5


def _run(out, extra, rank=0):
    train(load_job_config(TINY, BASE + extra + [f"train.output_dir={out}"]))
    return _losses(Path(out)) if rank == 0 else None  # rank 0 logs


def _graph_breaks() -> dict:
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


@pytest.mark.parametrize("family", [
    [],
    ["model.family=linear", "model.linear_attention.kind=lawcat"],
    ["model.family=mamba", "model.mamba.d_state=4"],
])
def test_compiled_blocks_train_like_eager(family, tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _run(tmp_path / "eager", family)
    compiled = _run(tmp_path / "compiled", family + ["train.compile=true"])
    assert sorted(compiled) == sorted(eager) == [1, 2, 3, 4]
    assert all(abs(compiled[s] - eager[s]) <= TOL for s in eager), (eager, compiled)
    breaks = _graph_breaks()
    assert breaks, "nothing was compiled"
    assert all("torch.compiler.disable" in reason for reason in breaks), breaks


def _cp_run(rank, world_size, root):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cp = ["parallel.cp=2", "parallel.cp_method=ring", "parallel.cp_layout=zigzag"]
    eager = _run(f"{root}/eager", cp, rank)
    compiled = _run(f"{root}/compiled", cp + ["train.compile=true"], rank)
    return eager, compiled, _graph_breaks()


def test_compiled_blocks_under_ring_attention_train_like_eager(tmp_path):
    for eager, compiled, breaks in run_distributed(_cp_run, 2, args=(str(tmp_path),),
                                                   timeout=400):
        if eager:  # the logging rank
            assert all(abs(compiled[s] - eager[s]) <= TOL for s in eager), (eager, compiled)
        assert breaks and all("torch.compiler.disable" in r for r in breaks), breaks


# every block kind that tensor parallelism shards: attention (A), linear attention (L),
# Mamba-1 (M) and Mamba-2 (S) mixers, each with its MLP
HYBRID_ALL = ["model.family=hybrid", "model.layer_pattern=LMSA", "model.num_layers=4",
              "model.mamba.d_state=4", "model.mamba.head_dim=8"]


TITANS_MAG = ["model.family=titans", "model.titans.variant=mag"]


def _tp_run(rank, world_size, root, model):
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager = _run(f"{root}/eager", model + ["parallel.tp=2"], rank)
    compiled = _run(f"{root}/compiled", model + ["parallel.tp=2", "train.compile=true"], rank)
    return eager, compiled, _graph_breaks(), counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("model", [HYBRID_ALL, TITANS_MAG], ids=["hybrid_LMSA", "titans_mag"])
def test_compiled_blocks_under_tensor_parallel_train_like_eager(model, tmp_path):
    """The embedding's sequence-sharded output (an asynchronous reduce-scatter) enters the first
    compiled block as a plain tensor; before, the block's backward handed DTensor's
    redistribution a plain gradient and the first step failed."""
    for eager, compiled, breaks, graphs in run_distributed(_tp_run, 2,
                                                           args=(str(tmp_path), model),
                                                           timeout=500):
        if eager:  # the logging rank
            assert sorted(compiled) == [1, 2, 3, 4]
            assert all(abs(compiled[s] - eager[s]) <= TOL for s in eager), (eager, compiled)
        assert graphs > 0, "nothing was compiled"
        assert breaks and all("torch.compiler.disable" in r for r in breaks), breaks


def test_compile_of_titans_mac_with_tensor_parallel_is_refused_by_name():
    with pytest.raises(ValueError, match="does not run Titans mac with parallel.tp > 1"):
        load_job_config(TINY, BASE + ["train.compile=true", "parallel.tp=2",
                                      "model.family=titans", "model.titans.variant=mac"])


def test_compile_names_a_model_without_blocks():
    from ctxscale.dist.parallelize import compile_each_block

    with pytest.raises(ValueError, match="has no `layers` of blocks.*train.compile=false"):
        compile_each_block(torch.nn.Linear(2, 2))
