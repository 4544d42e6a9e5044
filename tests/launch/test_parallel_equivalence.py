"""Every 4-process parallel layout trains exactly like one process.

5 optimizer steps of a 4-layer float32 Transformer on the same global batch (4 sequences of 48
tokens) and seed, under each layout of the 4D-parallelism issue; the logged losses must match the
single-process run within 1e-5 (absolute, losses ~4): every layout computes the same math, only
the order of float32 summations differs (all-reduces, reduce-scatters, per-shard partial sums),
which moves a loss by ~1e-7 relative per step.

All layouts run inside one `run_distributed` call (one pool, one process-group setup), one after
the other, each writing its own `metrics.jsonl`.
"""

from pathlib import Path

from ctxscale.launch.config import load_job_config
from ctxscale.launch.train import train
from tests.harness import run_distributed
from tests.launch.test_train import SMALL, TINY, _losses

GLOBAL_BATCH = 4
BASE = SMALL + ["model.num_layers=4", "train.steps=5"]
# name -> (overrides, data-parallel size); the per-rank batch is GLOBAL_BATCH / dp
LAYOUTS = {
    "dp4_fsdp": (["parallel.dp_engine=fsdp"], 4),
    "dp4_zero2": (["parallel.dp_engine=deepspeed", "parallel.zero_stage=2"], 4),
    # HSDP: parameters sharded over 2 ranks and replicated over the other 2
    "hsdp2x2": (["parallel.dp_replicate=2", "parallel.dp_shard=2"], 4),
    # FSDP over dp_shard x cp (the cp ranks shard the same parameters, gradients summed)
    "dp2_cp2_fsdp": (["parallel.cp=2", "parallel.cp_layout=zigzag"], 2),
    "tp2_dp2": (["parallel.tp=2"], 2),
    "tp2_cp2": (["parallel.tp=2", "parallel.cp=2"], 1),
    "pp2_dp2_1f1b": (["parallel.pp=2", "parallel.pp_schedule=1f1b"], 2),
    "pp2_tp2_gpipe": (["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=gpipe"], 1),
    "pp2_cp2": (["parallel.pp=2", "parallel.cp=2", "parallel.cp_layout=zigzag"], 1),
    "pp2_interleaved_v2": (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                            "parallel.pp_virtual_stages=2"], 2),
}
TOL = 1e-5


def _run_layouts(rank, world_size, root, base, layouts):
    """Train `base` under each of `layouts` ({name: (overrides, dp)}, in order) into root/name."""
    for name, (extra, dp) in layouts.items():
        train(load_job_config(TINY, base + extra + [
            f"train.batch_size={GLOBAL_BATCH // dp}", f"train.output_dir={root}/{name}"]))


def _single_process_losses(root, base):
    """The reference: `base` trained in this process on the whole global batch."""
    single = Path(root) / "single"
    train(load_job_config(TINY, base + [f"train.batch_size={GLOBAL_BATCH}",
                                        f"train.output_dir={single}"]))
    ref = _losses(single)
    assert sorted(ref) == [1, 2, 3, 4, 5]
    return ref


def _diverging(ref, root, runs):
    """(name, step, ref, got) for every logged loss of the runs `{name: steps}` under `root`
    that is off `ref` by more than TOL; each run must have logged exactly its steps."""
    bad = []
    for name, steps in runs.items():
        got = _losses(Path(root) / name)
        assert sorted(got) == steps, (name, got)
        bad += [(name, s, ref[s], got[s]) for s in steps if abs(got[s] - ref[s]) > TOL]
    return bad


def test_layouts_match_single_process(tmp_path):
    ref = _single_process_losses(tmp_path, BASE)
    # deepspeed last: it installs process-global state of its own
    names = [n for n in LAYOUTS if n != "dp4_zero2"] + ["dp4_zero2"]
    run_distributed(_run_layouts, 4, timeout=600,
                    args=(str(tmp_path), BASE, {name: LAYOUTS[name] for name in names}))
    bad = _diverging(ref, tmp_path, {name: [1, 2, 3, 4, 5] for name in names})
    assert not bad, f"layouts that diverge from one process (name, step, ref, got): {bad}"


# A hybrid stack with every layer kind the tp plan shards: L (LAWCAT linear attention with one
# ungated head and write gates: tp rank 0 holds an ungated and a gated head, rank 1 two gated
# ones, the replicated gate projections used by both), M (Mamba + MLP), A (softmax) and P
# (attention and Mamba side by side), trained under tp with each other axis, and a tp2 x dp2
# checkpoint resumed without tp (the Mamba channels and the linear layers' heads re-assembled
# from their DTensor shards).
HYBRID = BASE + ["model.family=hybrid", "model.layer_pattern=LMAP", "model.mamba.d_state=8",
                 "model.mamba.mlp=true", "model.mamba.bias=true",
                 "model.linear_attention.kind=lawcat",
                 "model.linear_attention.ungated_heads=[1,0,0,0]",
                 "model.linear_attention.write_gate=true"]
HYBRID_LAYOUTS = {
    "tp2_dp2": (["parallel.tp=2", "checkpoint.every=3", "checkpoint.keep_last=1"], 2),
    # the ring state exchange here (the other tests use the default all-gather)
    "tp2_cp2": (["parallel.tp=2", "parallel.cp=2", "parallel.cp_state_method=ring"], 1),
    "pp2_tp2": (["parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=1f1b"], 1),
}


# Mamba-2 with one group (B and C replicated under tp, the gated norm all-reduced) under tp
# with FSDP: the replicated parameters' partial-sum gradients reach the optimizer summed.
MAMBA2 = ["model.family=mamba2", "model.mamba.head_dim=16", "model.mamba.n_groups=1",
          "model.mamba.d_state=8", "model.linear_attention.ungated_heads=0"]


def test_hybrid_mamba_layouts_with_tensor_parallel_match_single_process(tmp_path):
    ref = _single_process_losses(tmp_path, HYBRID)
    ref_m2 = _single_process_losses(tmp_path / "m2", HYBRID + MAMBA2)
    resume = [f"checkpoint.resume={tmp_path}/tp2_dp2/checkpoints/step_00000003",
              "checkpoint.every=0", "parallel.cp=2"]
    layouts = HYBRID_LAYOUTS | {"resumed": (resume, 2),  # after tp2_dp2 wrote its checkpoint
                                "mamba2_tp2_dp2": (MAMBA2 + ["parallel.tp=2"], 2)}
    run_distributed(_run_layouts, 4, args=(str(tmp_path), HYBRID, layouts), timeout=600)
    runs = {name: [1, 2, 3, 4, 5] for name in HYBRID_LAYOUTS} | {"resumed": [4, 5]}
    bad = (_diverging(ref, tmp_path, runs)
           + _diverging(ref_m2, tmp_path, {"mamba2_tp2_dp2": [1, 2, 3, 4, 5]}))
    assert not bad, f"layouts that diverge from one process (name, step, ref, got): {bad}"


# Titans memory-as-gate (window attention with persistent tokens, neural memory in chunks)
# under tp with data and with context parallelism (the memory state passed between cp ranks),
# and memory-as-context (segments of 8, the block's outputs whole inside it) under tp x cp.
TITANS = BASE + ["model.family=titans", "model.titans.variant=mag", "model.titans.chunk_size=4",
                 "model.titans.window=8", "model.titans.persistent_tokens=2"]
TITANS_MAC = ["model.titans.variant=mac", "model.titans.segment_len=8"]
TITANS_LAYOUTS = {"tp2_dp2": (["parallel.tp=2"], 2),
                  "tp2_cp2": (["parallel.tp=2", "parallel.cp=2"], 1),
                  "mac_tp2_cp2": (TITANS_MAC + ["parallel.tp=2", "parallel.cp=2"], 1)}


def test_titans_layouts_with_tensor_parallel_match_single_process(tmp_path):
    ref = _single_process_losses(tmp_path / "mag", TITANS)
    ref_mac = _single_process_losses(tmp_path / "mac", TITANS + TITANS_MAC)
    run_distributed(_run_layouts, 4, args=(str(tmp_path), TITANS, TITANS_LAYOUTS), timeout=600)
    steps = [1, 2, 3, 4, 5]
    bad = (_diverging(ref, tmp_path, {"tp2_dp2": steps, "tp2_cp2": steps})
           + _diverging(ref_mac, tmp_path, {"mac_tp2_cp2": steps}))
    assert not bad, f"layouts that diverge from one process (name, step, ref, got): {bad}"
