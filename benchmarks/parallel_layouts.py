"""Step time, communication volume and memory of each 4-process parallel layout (CPU, gloo).

    python benchmarks/parallel_layouts.py [--steps 4] [--out benchmarks/results/parallel_layouts_cpu.md]

Every layout trains the same Transformer on the same global batch (the layouts of
tests/launch/test_parallel_equivalence.py). Each runs in 4 freshly spawned processes, so the peak
resident set size of a rank belongs to that layout alone. Per rank and optimizer step:

- step time: mean wall time of the measured steps (after one warm-up step), max over ranks;
- bytes sent: the payload of every collective / point-to-point call the rank issues (the local
  input tensor of all-reduce, all-gather, reduce-scatter, all-to-all, send), counted from the
  `torch.distributed` calls (FSDP2, DDP, DeepSpeed, pipelining, ctxscale.dist.comm) and from
  DTensor's functional collectives (tensor parallelism) through a dispatch mode. Payload, not
  wire bytes: a ring all-reduce moves about 2x its payload;
- peak RSS: `ru_maxrss` of the rank's process (includes the Python/torch baseline, ~0.4 GB);
- model state: parameter + optimizer-state bytes the rank holds (what sharding divides).

The baseline is the single-process run of the same model and batch in the same script.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from machine import cpu_name  # benchmarks/ is sys.path[0] when run as a script

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["model.dim=128", "model.num_layers=4", "model.num_heads=8", "model.num_kv_heads=4",
         "data.seq_len=128", "data.vocab_size=128", "data.num_kv_pairs=8"]
COMMON = ["train.progress=false", "train.tensorboard=false", "train.eval_every=0",
          "checkpoint.at_end=false", "checkpoint.resume=none", "optim.warmup_steps=2"]
GLOBAL_BATCH = 8
LAYOUTS = {  # name -> (overrides, data-parallel size)
    "single process": ([], 1),
    "dp4 (FSDP2)": (["parallel.dp_engine=fsdp"], 4),
    "dp4 (DeepSpeed ZeRO-2)": (["parallel.dp_engine=deepspeed", "parallel.zero_stage=2"], 4),
    "tp2 x dp2": (["parallel.tp=2"], 2),
    "tp2 x cp2 (ring)": (["parallel.tp=2", "parallel.cp=2"], 1),
    "pp2 x dp2 (1F1B)": (["parallel.pp=2", "parallel.pp_microbatches=4"], 2),
    "pp2 x tp2 (1F1B)": (["parallel.pp=2", "parallel.tp=2", "parallel.pp_microbatches=4"], 1),
    "pp2 x cp2 (1F1B, ring)": (["parallel.pp=2", "parallel.cp=2", "parallel.pp_microbatches=4"], 1),
    "pp2 interleaved v=2 x dp2": (["parallel.pp=2", "parallel.pp_schedule=interleaved_1f1b",
                                   "parallel.pp_virtual_stages=2", "parallel.pp_microbatches=4"], 2),
}


# ----------------------------------------------------------------------------- byte counting
class _Counter:
    def __init__(self):
        self.bytes = 0
        self.calls = 0

    def add(self, t):
        if isinstance(t, torch.Tensor):
            self.bytes += t.numel() * t.element_size()
            self.calls += 1


def _install_counters(counter: _Counter):
    """Wrap torch.distributed's collectives (payload = the local input tensor) and count
    DTensor's functional collectives with a dispatch mode; returns the mode to enter."""
    import torch.distributed as dist
    from torch.utils._python_dispatch import TorchDispatchMode

    def wrap(name, arg_index, kwarg):
        fn = getattr(dist, name)

        def counted(*args, **kwargs):
            if counter.active:
                tensor = args[arg_index] if len(args) > arg_index else kwargs.get(kwarg)
                if isinstance(tensor, list):
                    for t in tensor:
                        counter.add(t)
                else:
                    counter.add(tensor)
            return fn(*args, **kwargs)

        setattr(dist, name, counted)

    for name, idx, kw in [
        ("all_reduce", 0, "tensor"), ("broadcast", 0, "tensor"), ("reduce", 0, "tensor"),
        ("all_gather_into_tensor", 1, "input_tensor"), ("all_gather_single", 1, "input_tensor"),
        ("reduce_scatter_tensor", 1, "input"), ("reduce_scatter_single", 1, "input"),
        ("all_to_all_single", 1, "input"), ("send", 0, "tensor"),  # isend: counted in batch_isend_irecv (P2POp checks identity)
        ("all_gather", 1, "tensor"), ("reduce_scatter", 1, "input_list"),
    ]:
        if hasattr(dist, name):
            wrap(name, idx, kw)
    batch = dist.batch_isend_irecv

    def counted_batch(ops):
        if counter.active:
            for op in ops:
                if getattr(op.op, "__name__", "") == "isend":
                    counter.add(op.tensor)
        return batch(ops)

    dist.batch_isend_irecv = counted_batch
    functional = {"all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce",
                  "all_to_all_single", "all_gather_into_tensor_coalesced",
                  "reduce_scatter_tensor_coalesced", "all_reduce_coalesced"}

    class FunctionalCollectives(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if counter.active and func.namespace == "_c10d_functional" and \
                    func._opname in functional:
                first = args[0]
                for t in first if isinstance(first, (list, tuple)) else [first]:
                    counter.add(t)
            return func(*args, **(kwargs or {}))

    return FunctionalCollectives()


def _state_bytes(st) -> int:
    def local(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()

    n = sum(local(p) for p in st.model.parameters())
    opt = st.engine.engine.optimizer if st.engine is not None else st.optimizer
    inner = getattr(opt, "optimizer", opt)
    for state in inner.state.values():
        n += sum(local(v) for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0)
    if st.engine is not None and st.engine.zero_stage >= 1:
        # ZeRO keeps fp32 master partitions inside its optimizer's param groups
        n += sum(local(p) for g in inner.param_groups for p in g["params"])
    return n


# ----------------------------------------------------------------------------- one layout
def _rank_main(rank, world, port, overrides, steps, out_dir, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from ctxscale.launch.config import load_job_config
    from ctxscale.launch.train import TrainState

    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    counter = _Counter()
    counter.active = False
    mode = _install_counters(counter)
    cfg = load_job_config(ROOT / "configs" / "tiny.yaml",
                          MODEL + COMMON + overrides + [f"train.output_dir={out_dir}"])
    st = TrainState(cfg)
    st.train_step()  # warm-up (pipeline shape inference, first FSDP all-gathers)
    times = []
    counter.active = True
    with mode:
        for _ in range(steps):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            out = st.train_step()
            times.append(time.perf_counter() - t0)
    counter.active = False
    results.put((rank, {
        "step_s": sum(times) / len(times), "bytes": counter.bytes / steps,
        "calls": counter.calls / steps, "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "state": _state_bytes(st), "loss": out["loss"],
    }))
    if world > 1:
        dist.destroy_process_group()


def run_layout(overrides, dp, steps, out_dir) -> list[dict]:
    world = 1 if not overrides else 4
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    args = overrides + [f"train.batch_size={GLOBAL_BATCH // dp}"]
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, args, steps, out_dir, results))
             for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=900) for _ in procs)
    for p in procs:
        p.join()
    return [got[r] for r in range(world)]


def machine() -> str:
    cpu = cpu_name()
    return f"{cpu}, {os.cpu_count()} logical cores visible, torch {torch.__version__}, gloo"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "parallel_layouts_cpu.md"))
    p.add_argument("--only", nargs="*", default=None, help="layout names to run")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(ROOT))
    rows, base = [], None
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "ctxscale_parallel_layouts"
    for name, (overrides, dp) in LAYOUTS.items():
        if args.only and name not in args.only and name != "single process":
            continue
        res = run_layout(overrides, dp, args.steps, str(tmp / name.replace(" ", "_")))
        step = max(r["step_s"] for r in res)
        base = base or step
        rows.append((name, step, step / base, max(r["bytes"] for r in res),
                     max(r["calls"] for r in res), max(r["rss"] for r in res),
                     max(r["state"] for r in res), res[0]["loss"]))
        print(f"{name:28s} {step * 1e3:8.1f} ms  {rows[-1][3] / 2**20:8.2f} MiB sent", flush=True)
    lines = [
        "# Parallel layouts on CPU (4 gloo processes)", "",
        f"Machine: {machine()}. Model: Transformer dim 128, 4 layers, 8 heads / 4 kv heads, "
        f"vocab 128; global batch {GLOBAL_BATCH} x 128 tokens, float32; {args.steps} measured "
        "steps after one warm-up. Per-rank numbers are the maximum over the 4 ranks. "
        "`bytes sent` is collective/p2p payload per optimizer step (see the script's docstring); "
        "`model state` is parameters + optimizer state held by the rank; peak RSS includes the "
        "~0.4 GB Python/torch baseline. On a CPU with few cores the 4 ranks share cores, so step "
        "times measure overheads (synchronization, bubbles, extra collectives), not speedups.",
        "", "Command: `python benchmarks/parallel_layouts.py`", "",
        "| layout | step time (ms) | vs 1 process | bytes sent / rank / step | collective calls / step "
        "| peak RSS / rank (MiB) | model state / rank (KiB) | loss after last step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, step, ratio, sent, calls, rss, state, loss in rows:
        lines.append(f"| {name} | {step * 1e3:.1f} | {ratio:.2f}x | {sent / 2**20:.2f} MiB | "
                     f"{calls:.0f} | {rss / 2**20:.0f} | {state / 2**10:.0f} | {loss:.5f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
