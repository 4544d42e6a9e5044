"""Pipeline stage layout and validation (the schedules' numerics are checked end to end in
tests/launch/test_parallel_equivalence.py: GPipe, 1F1B and interleaved 1F1B == one process)."""

import pytest

from ctxscale.dist.mesh import ParallelDims
from ctxscale.dist.pipeline import carve_stage, split_layers, stage_ids
from ctxscale.launch.config import load_job_config
from ctxscale.models.config import ModelConfig
from ctxscale.models.transformer import Transformer
from tests.launch.test_train import SMALL, TINY


def test_split_layers_even_and_contiguous():
    assert split_layers(4, 2) == [[0, 1], [2, 3]]
    assert split_layers(7, 3) == [[0, 1, 2], [3, 4], [5, 6]]  # earlier stages take the rest
    assert split_layers(5, 5) == [[i] for i in range(5)]
    with pytest.raises(ValueError, match="num_layers=3 is fewer than the 4 pipeline stages"):
        split_layers(3, 4)


def test_interleaved_stage_placement():
    assert stage_ids(0, 2, 2) == [0, 2] and stage_ids(1, 2, 2) == [1, 3]
    assert stage_ids(1, 4, 1) == [1]


def test_carved_stages_keep_whole_model_names():
    model = Transformer(ModelConfig(dim=16, num_layers=5, num_heads=2, vocab_size=11))
    full = dict(model.named_parameters())
    parts = [carve_stage(model, s, 3, ids) for s, ids in enumerate(split_layers(5, 3))]
    names = [set(dict(p.named_parameters())) for p in parts]
    assert set().union(*names) == set(full) and sum(map(len, names)) == len(full)
    assert "tok_embeddings.weight" in names[0] and "output.weight" in names[2]
    assert parts[1].tok_embeddings is None and parts[1].norm is None and parts[1].output is None
    assert set(parts[2].layers) == {"4"}
    for p in parts:  # copies with the same values
        for n, t in p.named_parameters():
            assert t is not full[n] and t.equal(full[n])


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=4", "model.num_layers=2"], "fewer than the 4 pipeline stages"),
    (["parallel.pp=2", "parallel.pp_virtual_stages=2", "parallel.pp_schedule=1f1b",
      "model.num_layers=4"], "needs parallel.pp_schedule=interleaved_1f1b"),
    (["parallel.pp=2", "parallel.pp_microbatches=3"], "divisible by parallel.pp_microbatches=3"),
    (["parallel.tp=3", "model.num_heads=4"], "divisible by parallel.tp=3"),
    (["parallel.tp=2", "parallel.cp=2", "data.seq_len=50"], "cannot be split|multiple of cp x tp"),
    (["parallel.pp=2", "parallel.dp_engine=deepspeed"], "deepspeed runs ZeRO"),
    (["parallel.pp=2", "model.tie_embeddings=true"], "tie_embeddings=true cannot be pipelined"),
])
def test_layout_validation_messages(overrides, message):
    with pytest.raises(Exception, match=message):
        load_job_config(TINY, SMALL + overrides)


def test_world_size_mismatch_message():
    par = load_job_config(TINY, SMALL + ["parallel.tp=2", "parallel.pp=2",
                                         "parallel.dp_shard=2"]).parallel
    with pytest.raises(ValueError, match="do not match the 4 processes launched"):
        ParallelDims.from_config(par, 4)
    par = load_job_config(TINY, SMALL + ["parallel.tp=2", "parallel.pp=2"]).parallel
    with pytest.raises(ValueError, match="world size 6 is not divisible"):
        ParallelDims.from_config(par, 6)
    assert ParallelDims.from_config(par, 8).dp_shard == 2
