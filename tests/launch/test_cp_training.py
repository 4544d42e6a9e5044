"""Context-parallel training == one process: a 4-layer Transformer, 5 steps, cp=4, every method.

Same global batch, same seed, float32. The losses and the final weights must agree within 1e-5:
context parallelism is exact (online-softmax merges in float32 change only summation order).

Adam's epsilon is raised to 1e-6 here: an update is lr·m/(sqrt(v)+eps), so a float32 rounding
difference δg in a near-zero gradient moves the weight by up to lr·δg/eps. With eps=1e-8 that
turns 1e-10 rounding into ~3e-5 weight differences (seen: one element of 3072 at 1.4e-5); with
eps=1e-6 the bound is ~3e-7, and any real gradient error still shows at full size.
"""

import pytest
import torch

from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train
from tests.harness import run_distributed
from tests.launch.test_train import SMALL, TINY, _losses

CP_CASES = [  # (method, layout, extra overrides)
    ("ring", "contiguous", []),
    ("ring", "zigzag", []),
    ("ring", "stripe", []),
    ("rsa", "contiguous", []),
    ("lightseq", "contiguous", []),
    ("ulysses", "contiguous", []),
    ("usp", "zigzag", ["parallel.ulysses_degree=2"]),
]
BASE = SMALL + ["model.num_layers=4", "data.seq_len=56", "train.steps=5", "train.batch_size=2",
                "checkpoint.at_end=true", "optim.eps=1e-6"]


def _final_weights(out_dir):
    from ctxscale.launch.checkpoint import latest_checkpoint

    return str(latest_checkpoint(f"{out_dir}/checkpoints"))


def _cp_run(rank, world_size, cases, root):
    finals = {}
    for method, layout, extra in cases:
        out = f"{root}/{method}_{layout}"
        cfg = load_job_config(TINY, BASE + extra + [
            f"train.output_dir={out}", "parallel.cp=4", f"parallel.cp_method={method}",
            f"parallel.cp_layout={layout}", "parallel.dp_engine=ddp"])
        finals[(method, layout)] = train(cfg)["final_loss"]
    return finals


def _load_model_weights(ckpt_dir):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    target = f"{ckpt_dir}/full.pt"
    dcp_to_torch_save(ckpt_dir, target)
    state = torch.load(target, weights_only=True)
    del dcp
    return state["model"]


@pytest.mark.timeout(1200)
def test_cp4_training_matches_single_process(tmp_path):
    single = tmp_path / "single"
    train(load_job_config(TINY, BASE + [f"train.output_dir={single}"]))
    run_distributed(_cp_run, 4, args=(CP_CASES, str(tmp_path)), timeout=1200)
    ref_losses = _losses(single)
    ref_weights = _load_model_weights(_final_weights(single))
    for method, layout, _ in CP_CASES:
        out = tmp_path / f"{method}_{layout}"
        losses = _losses(out)
        assert sorted(losses) == sorted(ref_losses)
        for step, value in ref_losses.items():
            assert abs(losses[step] - value) <= 1e-5, (method, layout, step, losses[step], value)
        weights = _load_model_weights(_final_weights(out))
        for name, w in ref_weights.items():
            torch.testing.assert_close(weights[name], w, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, n=name: f"{method}/{layout} {n}: {m}")
