"""Context parallelism for the recurrent families: cp = 2 and 4 (contiguous layout) equal one
process, for Mamba, Mamba-2, every linear-attention kind and hybrid stacks (softmax layers through
`ParallelContext.attention`), model by model and over 5 training steps.

Oracle: every rank builds the same float64 model and global batch and runs the full sequence;
the float32 context-parallel model (same weights) runs this rank's contiguous shard. Local
logits and the all-reduced parameter gradients of the summed token loss must agree within 1e-5
relative to their scale (float32 rounding of exact algorithms; the state passing and halo
exchange are exact). Training: `ctxscale.launch.train.train` for 5 steps at cp = 2 / 4 gives the
losses of cp = 1 within 1e-5 (float32, only the reduction order differs).
"""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from ctxscale.dist.context import ParallelContext
from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train
from ctxscale.models import build_model
from tests.harness import run_distributed
from tests.launch.test_train import SMALL, _losses
from tests.models._recurrent_util import perturb, small_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SEQ = 44  # 22 tokens per rank at cp = 2, 11 at cp = 4 (>= conv width - 1)
MODEL_CASES = [  # (family, linear-attention kind, layer pattern)
    ("mamba", "plain", "M"),
    ("mamba2", "plain", "S"),
    ("linear", "plain", "L"),
    ("linear", "decay", "L"),
    ("linear", "hedgehog", "L"),
    ("linear", "lawcat", "L"),
    ("hybrid", "lawcat", "LMPA"),
]


def _close(actual, expected, what):
    scale = max(expected.abs().max().item(), 1e-3)
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=1e-5 * scale,
                               msg=lambda m: f"{what}: {m}")


def _model_oracle(rank, world_size, cases):
    for family, kind, pattern in cases:
        cfg = small_config(family, kind=kind, pattern=pattern, num_layers=len(pattern) + 1)
        torch.manual_seed(0)
        ref = build_model(cfg).double()
        perturb(ref)
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=g)
        labels = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=g)
        labels[:, :3] = -100
        ref_logits = ref(ids)
        ref(ids, labels=labels, loss_reduction="sum").backward()

        ctx = ParallelContext(cp_group=dist.group.WORLD, cp_size=world_size, cp_rank=rank,
                              cp_method="ring", cp_layout="contiguous")
        model = build_model(small_config(family, kind=kind, pattern=pattern,
                                         num_layers=len(pattern) + 1), ctx)
        model.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
        n = SEQ // world_size
        sl = slice(rank * n, (rank + 1) * n)
        what = f"{family}/{kind}/{pattern} cp={world_size} rank {rank}"
        _close(model(ids[:, sl]), ref_logits[:, sl], f"{what} logits")
        loss = model(ids[:, sl], labels=labels[:, sl], loss_reduction="sum")
        loss.backward()
        for (name, p), (_, pr) in zip(model.named_parameters(), ref.named_parameters()):
            grad = p.grad.clone()
            dist.all_reduce(grad)
            _close(grad, pr.grad, f"{what} grad {name}")
    return True


@pytest.mark.parametrize("world", [2, 4])
def test_models_match_single_process(world):
    assert all(run_distributed(_model_oracle, world, args=(MODEL_CASES,), timeout=600))


def test_recurrent_layers_need_contiguous_layout():
    ctx = ParallelContext(cp_size=2, cp_rank=0, cp_layout="zigzag")
    q = torch.randn(1, 4, 2, 3)
    with pytest.raises(ValueError, match="cp_layout=contiguous"):
        ctx.linear_attention(q, q, q)
    with pytest.raises(ValueError, match="cp_layout=contiguous"):
        ctx.causal_conv1d(torch.randn(1, 3, 4), torch.randn(3, 2))


# ------------------------------------------------------------------ training equivalence
TRAIN_BASE = [o for o in SMALL if not o.startswith("model.num_layers")] + [
    "train.steps=5", "parallel.dp_engine=ddp", "parallel.cp_layout=contiguous"]
TRAIN_CASES = [  # (config file, overrides, cp sizes)
    ("mamba_tiny.yaml", ["model.num_layers=2", "model.mamba.d_state=5"], (2, 4)),
    ("linear_tiny.yaml", ["model.linear_attention.kind=lawcat"], (2, 4)),
    ("linear_tiny.yaml", ["model.linear_attention.kind=hedgehog"], (2, 4)),
    ("linear_tiny.yaml", ["model.linear_attention.kind=decay"], (2, 4)),
    ("linear_tiny.yaml", ["model.linear_attention.kind=plain"], (2, 4)),
    ("hybrid_tiny.yaml", ["model.layer_pattern=LMPA", "model.mamba.d_state=5"], (2, 4)),
    ("mamba2_tiny.yaml", ["model.num_layers=2", "model.mamba.d_state=5"], (2,)),
]


def _train_cp(rank, world_size, runs):
    for cfg_file, overrides, out in runs:
        train(load_job_config(CONFIGS / cfg_file, TRAIN_BASE + overrides + [
            f"train.output_dir={out}", f"parallel.cp={world_size}"]))
    return True


@pytest.mark.timeout(1200)
def test_training_matches_single_process(tmp_path):
    runs = {2: [], 4: []}
    for i, (cfg_file, overrides, sizes) in enumerate(TRAIN_CASES):
        train(load_job_config(CONFIGS / cfg_file, TRAIN_BASE + overrides + [
            f"train.output_dir={tmp_path}/single{i}"]))
        for cp in sizes:
            runs[cp].append((cfg_file, overrides, f"{tmp_path}/cp{cp}_{i}"))
    for cp, items in runs.items():
        assert all(run_distributed(_train_cp, cp, args=(items,), timeout=1200))
    for i, (cfg_file, overrides, sizes) in enumerate(TRAIN_CASES):
        ref = _losses(tmp_path / f"single{i}")
        assert sorted(ref) == [1, 2, 3, 4, 5]
        for cp in sizes:
            got = _losses(tmp_path / f"cp{cp}_{i}")
            assert sorted(got) == sorted(ref)
            for step, value in ref.items():
                assert abs(got[step] - value) <= 1e-5 * max(1.0, abs(value)), (
                    cfg_file, overrides, cp, step, got[step], value)
