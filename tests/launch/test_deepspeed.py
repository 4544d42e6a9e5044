"""DeepSpeed ZeRO (parallel.dp_engine=deepspeed) on CPU/gloo: stages 1 and 3 at dp=2 train like
one process (stage 2 at dp=4 is in test_parallel_equivalence), and a ZeRO checkpoint resumes
exactly. Same config as FSDP otherwise; tolerance 1e-5 as in the other equivalence tests."""

from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train
from tests.harness import run_distributed
from tests.launch.test_train import SMALL, TINY, _losses

BASE = SMALL + ["train.steps=4", "parallel.dp_engine=deepspeed"]
TOL = 1e-5


def _zero_runs(rank, world_size, root):
    for stage in (1, 3):
        train(load_job_config(TINY, BASE + [f"parallel.zero_stage={stage}", "train.batch_size=2",
                                            f"train.output_dir={root}/zero{stage}"]))
    # stage 2 with a checkpoint at step 2, then a fresh job resuming from it
    common = BASE + ["parallel.zero_stage=2", "train.batch_size=2", "checkpoint.every=2"]
    train(load_job_config(TINY, common + [f"train.output_dir={root}/zero2"]))
    train(load_job_config(TINY, common + [
        f"train.output_dir={root}/zero2_resumed",
        f"checkpoint.resume={root}/zero2/checkpoints/step_00000002"]))


def test_zero_stages_and_resume_match_single_process(tmp_path):
    single = tmp_path / "single"
    train(load_job_config(TINY, BASE[:-1] + ["train.batch_size=4", f"train.output_dir={single}"]))
    ref = _losses(single)
    run_distributed(_zero_runs, 2, args=(str(tmp_path),), timeout=400)
    for name, steps in [("zero1", range(1, 5)), ("zero3", range(1, 5)), ("zero2", range(1, 5)),
                        ("zero2_resumed", range(3, 5))]:
        got = _losses(tmp_path / name)
        assert sorted(got) == list(steps), (name, got)
        for s in steps:
            assert abs(got[s] - ref[s]) <= TOL, (name, s, ref[s], got[s])
