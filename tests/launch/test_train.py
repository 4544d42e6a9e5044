"""The training loop: learning, exact resume after a kill, and data parallel == one process."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train
from tests.harness import run_distributed

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny.yaml"
SMALL = [
    "model.dim=32", "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2",
    "data.seq_len=48", "data.vocab_size=64", "data.num_kv_pairs=4", "train.batch_size=4",
    "train.progress=false", "train.tensorboard=false", "train.eval_every=0",
    "train.eval_batches=2", "optim.warmup_steps=2", "checkpoint.at_end=false",
    "checkpoint.resume=none",
]


def _losses(out_dir: Path) -> dict[int, float]:
    """step -> loss of the last record logged for that step (a resumed run re-logs steps)."""
    losses = {}
    for line in (out_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            losses[rec["step"]] = rec["loss"]
    return losses


def test_metrics_records_and_learning(tmp_path):
    cfg = load_job_config(TINY, SMALL + ["train.steps=25", f"train.output_dir={tmp_path}",
                                         "optim.lr=1e-2", "train.eval_every=25"])
    summary = train(cfg)
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 26))
    for r in steps:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= r.keys()
    # warmup then cosine: lr rises over the first steps, then falls
    assert steps[0]["lr"] < steps[1]["lr"] and steps[-1]["lr"] < steps[2]["lr"]
    assert summary["final_loss"] < summary["first_loss"] - 0.3
    assert "final_eval_accuracy" in summary and "final_eval_loss" in summary


def _train_cmd(out_dir, extra):
    return [sys.executable, "-m", "ctxscale.launch.train", "--config", str(TINY), *SMALL,
            f"train.output_dir={out_dir}", *extra]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    common = ["train.steps=10", "checkpoint.every=2", "checkpoint.keep_last=2"]
    straight = tmp_path / "straight"
    subprocess.run(_train_cmd(straight, common), check=True, capture_output=True, timeout=300)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_train_cmd(killed, common), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    target = killed / "checkpoints" / "step_00000004"
    deadline = time.monotonic() + 300
    while not target.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert target.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no ckpt"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before_kill = max(_losses(killed))
    assert done_before_kill < 10, "the run finished before it could be killed"

    resumed = subprocess.run(_train_cmd(killed, common[:2] + ["checkpoint.resume=auto"]),
                             check=True, capture_output=True, text=True, timeout=300)
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = _losses(straight), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    for step in range(1, 11):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_incomplete_checkpoint_is_ignored(tmp_path):
    from ctxscale.launch.checkpoint import latest_checkpoint

    (tmp_path / "step_00000008.tmp").mkdir()
    (tmp_path / "step_00000004").mkdir()
    assert latest_checkpoint(tmp_path).name == "step_00000004"


def _dp_train(rank, world_size, out_dir, engine, extra):
    cfg = load_job_config(TINY, SMALL + extra + [f"train.output_dir={out_dir}",
                                                 f"parallel.dp_engine={engine}"])
    summary = train(cfg)
    return summary["final_loss"]


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_data_parallel_matches_single_process(tmp_path, engine):
    """2 ranks x batch 2 see the same global batch as 1 rank x batch 4: the same losses."""
    steps = ["train.steps=5"]
    single = tmp_path / "single"
    train(load_job_config(TINY, SMALL + steps + ["train.batch_size=4", f"train.output_dir={single}"]))
    out = tmp_path / engine
    run_distributed(_dp_train, 2, args=(str(out), engine, steps + ["train.batch_size=2"]))
    a, b = _losses(single), _losses(out)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    for s in a:
        # float32, different reduction order across ranks: ~1e-7 relative per op
        assert abs(a[s] - b[s]) <= 1e-5 * max(1.0, abs(a[s])), (s, a[s], b[s])


def _async_vs_sync(rank, world_size, root):
    from torch.distributed.distributed_c10d import _world

    groups = []  # process groups alive after each job (no public count)
    for mode in ("sync", "async"):
        cfg = load_job_config(TINY, SMALL + [
            "train.steps=6", "checkpoint.every=2", "checkpoint.keep_last=2",
            f"checkpoint.async_save={'true' if mode == 'async' else 'false'}",
            f"train.output_dir={root}/{mode}", "parallel.dp_engine=fsdp", "train.batch_size=2"])
        train(cfg)
        groups.append(len(_world.pg_map))
    return groups


def test_async_checkpoint_equals_sync_checkpoint(tmp_path):
    """Asynchronous saves (DCP async_save, finished before the next save) hold exactly the
    state a synchronous save holds: later steps do not leak into a checkpoint still writing.
    The two jobs in one process leave as many process groups as one."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    groups = run_distributed(_async_vs_sync, 2, args=(str(tmp_path),))
    # the second job reuses the first one's mesh and destroys its writer's group: a job run
    # again in one process leaves no gloo groups (and their threads) behind
    assert all(g[0] == g[1] for g in groups), groups
    states = {}
    for mode in ("sync", "async"):
        ckpts = sorted(p.name for p in (tmp_path / mode / "checkpoints").iterdir())
        assert ckpts == ["step_00000004", "step_00000006"], ckpts  # keep_last=2, no .tmp left
        folder = tmp_path / mode / "checkpoints" / "step_00000004"
        dcp_to_torch_save(folder, tmp_path / f"{mode}.pt")
        states[mode] = torch.load(tmp_path / f"{mode}.pt", weights_only=True)["model"]
    for name, w in states["sync"].items():
        assert torch.equal(states["async"][name], w), name


def test_resume_with_another_model_names_the_difference(tmp_path):
    """Resuming a checkpoint with other model settings fails before anything is loaded, with
    the differing tensors and the fix; the checkpoint is left as it was."""
    out = tmp_path / "run"
    train(load_job_config(TINY, SMALL + ["train.steps=2", "checkpoint.every=2",
                                         f"train.output_dir={out}"]))
    ckpt = out / "checkpoints" / "step_00000002"
    before = sorted((p.name, p.stat().st_size) for p in ckpt.iterdir())
    other = SMALL + ["train.steps=4", "model.num_layers=3", "model.dim=48",
                     f"train.output_dir={tmp_path / 'other'}", f"checkpoint.resume={ckpt}"]
    with pytest.raises(ValueError, match=r"holds a different model: 9 of this model's tensors "
                       r"are not in it \(layers\.2\..*shapes differ for layers\.0\.attention\.wk\.weight "
                       r"\(saved \(16, 32\), model \(24, 48\)\).*checkpoint.resume=none"):
        train(load_job_config(TINY, other))
    assert sorted((p.name, p.stat().st_size) for p in ckpt.iterdir()) == before
    # a shallower model: DCP alone would load the first layer and drop the second silently
    shallower = SMALL + ["train.steps=4", "model.num_layers=1",
                         f"train.output_dir={tmp_path / 'shallow'}", f"checkpoint.resume={ckpt}"]
    with pytest.raises(ValueError, match=r"holds a different model: 9 of its tensors are not in "
                       r"this model \(layers\.1\."):
        train(load_job_config(TINY, shallower))


def test_checkpoint_of_fused_mamba_in_proj_is_named(tmp_path):
    """A checkpoint written before Mamba's in_proj was split into in_proj_x / in_proj_z says so."""
    from ctxscale.launch.checkpoint import check_model_matches, save_dcp

    save_dcp({"model": {"layers.0.mixer.in_proj.weight": torch.zeros(8, 2)}}, tmp_path)
    model_sd = {"layers.0.mixer.in_proj_x.weight": torch.zeros(4, 2),
                "layers.0.mixer.in_proj_z.weight": torch.zeros(4, 2)}
    with pytest.raises(ValueError, match=r"2 of this model's tensors are not in it.*1 of its "
                       r"tensors are not in this model.*fused in_proj.*in_proj_x and in_proj_z"):
        check_model_matches(tmp_path, model_sd)
    check_model_matches(tmp_path, {"layers.0.mixer.in_proj.weight": torch.zeros(8, 2)})


def test_summary_shows_an_end_of_run_evaluation_without_a_first_one():
    """Without train.eval_every there is no step-0 evaluation: the summary shows the final one
    alone (it used to drop the loss and print 'nan ->' for the accuracy)."""
    from ctxscale.launch.train import format_summary

    base = dict(steps=5, elapsed_s=1.0, tokens_per_s=10.0, first_loss=4.0, final_loss=3.0,
                peak_memory_bytes=2**20, kernels={})
    both = format_summary(base | dict(initial_eval_loss=4.1, final_eval_loss=3.1,
                                      initial_eval_accuracy=0.1, final_eval_accuracy=0.2), "o")
    assert "eval loss        4.1000 -> 3.1000" in both and "eval accuracy    0.100 -> 0.200" in both
    end = format_summary(base | dict(final_eval_loss=3.1, final_eval_accuracy=0.2), "o")
    assert "eval loss        3.1000 (end of run)" in end and "nan" not in end
    assert "eval accuracy    0.200 (end of run)" in end
