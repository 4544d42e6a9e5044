"""A checkpoint saved under one parallel layout resumes under another, exactly; export.

10 steps in one process == 5 steps under tp2 x dp2 (FSDP2 over dp, Megatron TP) then 5 more
resumed from its step-5 DCP checkpoint under cp2 x dp2 and, separately, under pp2 x dp2 (1F1B).
The checkpoint stores DTensor shards under the whole model's parameter names (model, AdamW
state), the scheduler, the RNG and the global data position, so a different layout loads the
same state. Tolerance 1e-5 on the losses (float32, only summation order differs, see
test_parallel_equivalence). The step-5 checkpoint, exported to one safetensors file without a
process group, equals the single-process model's weights within 1e-5.
"""


import torch

from ctxscale.launch.config import load_job_config
from ctxscale.launch.export import export_checkpoint
from ctxscale.launch.train import train
from tests.harness import run_distributed
from tests.launch.test_train import SMALL, TINY, _losses

BASE = SMALL + ["model.num_layers=4", "train.steps=10", "checkpoint.every=5",
                "checkpoint.keep_last=2"]
TOL = 1e-5
RESUME_LAYOUTS = {"cp2_dp2": ["parallel.cp=2"], "pp2_dp2": ["parallel.pp=2"]}


def _save_then_resume(rank, world_size, root):
    train(load_job_config(TINY, BASE + ["parallel.tp=2", "train.batch_size=2",
                                        f"train.output_dir={root}/tp2_dp2"]))
    ckpt = f"{root}/tp2_dp2/checkpoints/step_00000005"
    for name, extra in RESUME_LAYOUTS.items():
        train(load_job_config(TINY, BASE + extra + [
            "train.batch_size=2", f"train.output_dir={root}/{name}",
            f"checkpoint.resume={ckpt}", "checkpoint.every=0"]))


def test_resume_under_another_layout(tmp_path):
    single = tmp_path / "single"
    train(load_job_config(TINY, BASE + ["train.batch_size=4", f"train.output_dir={single}"]))
    ref = _losses(single)
    assert sorted(ref) == list(range(1, 11))
    run_distributed(_save_then_resume, 4, args=(str(tmp_path),), timeout=400)
    first = _losses(tmp_path / "tp2_dp2")
    for step in range(1, 6):
        assert abs(first[step] - ref[step]) <= TOL, ("tp2_dp2", step, ref[step], first[step])
    for name in RESUME_LAYOUTS:
        got = _losses(tmp_path / name)
        assert sorted(got) == list(range(6, 11)), (name, got)
        for step in range(6, 11):
            assert abs(got[step] - ref[step]) <= TOL, (name, step, ref[step], got[step])

    # export the tp2 x dp2 checkpoint and the single-process one: the same weights
    from safetensors.torch import load_file

    a = export_checkpoint(tmp_path / "tp2_dp2", checkpoint="step_00000005",
                          safetensors_path=tmp_path / "tp.safetensors")["safetensors"]
    b = export_checkpoint(single, checkpoint="step_00000005",
                          safetensors_path=tmp_path / "single.safetensors")["safetensors"]
    wa, wb = load_file(str(a)), load_file(str(b))
    assert sorted(wa) == sorted(wb) and "output.weight" in wa and "layers.3.feed_forward.w2.weight" in wa
    for name in wa:
        assert wa[name].shape == wb[name].shape, name
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=TOL, msg=name)
