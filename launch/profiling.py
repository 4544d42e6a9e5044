"""Step profiling (`profile.*` in the job config): a `torch.profiler` trace of a window of
training steps on every rank, as torchtitan's `--profiling.enable_profiling`.

The window is global steps [start_step, start_step + steps - 1] (the defaults skip two steps of
warm-up: allocator growth, torch.compile, Triton autotuning). Each step in it is a
`ctxscale.step <n>` range in the trace, around the forward, backward and optimizer step of
all its micro-batches (and pipeline schedule). When the window closes each rank writes, under
`profile.folder` (default `<train.output_dir>/profile`):

- `rank<r>_steps<a>-<b>.json`: the Chrome trace (CPU operators, and CUDA kernels on a GPU);
  open it in https://ui.perfetto.dev or chrome://tracing;
- `rank<r>_ops.txt`: the operators by self time (self CUDA time on a GPU), top 40;
- with `profile.memory` on CUDA, `rank<r>_memory.pickle`: the allocator history of the window
  (https://pytorch.org/memory_viz); on every device the trace then carries the allocations.

A run resumed past the window profiles nothing and says so; a run that stops inside it (the
last step) writes what it recorded.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

TOP_OPS = 40


class StepProfiler:
    """`with profiler.step(n): ...` around each training step `n` (1-based)."""

    def __init__(self, cfg, *, output_dir: Path, rank: int, device: torch.device,
                 first_step: int = 1, log=print) -> None:
        self.cfg = cfg
        self.enabled = bool(cfg.enabled)
        self.first = cfg.start_step
        self.last = cfg.start_step + cfg.steps - 1
        self.folder = Path(cfg.folder) if cfg.folder else Path(output_dir) / "profile"
        self.rank, self.device, self.log = rank, device, log
        self._prof = None
        self._recorded: list[int] = []
        self.written: list[Path] = []
        if self.enabled and first_step > self.last:
            self.enabled = False
            log(f"profile: steps {self.first}-{self.last} were run before this resume (at "
                f"step {first_step - 1}); nothing is profiled (raise profile.start_step)")

    def _cuda(self) -> bool:
        return self.device.type == "cuda" and torch.cuda.is_available()

    def _start(self) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._cuda() else [])
        if self.cfg.memory and self._cuda():
            torch.cuda.memory._record_memory_history(max_entries=200_000)
        self._prof = profile(activities=activities, record_shapes=self.cfg.record_shapes,
                             profile_memory=self.cfg.memory, with_stack=self.cfg.with_stack)
        self._prof.__enter__()

    @contextlib.contextmanager
    def step(self, n: int):
        active = self.enabled and self.first <= n <= self.last
        if active and self._prof is None:
            self._start()
        if not active:
            yield
            return
        with torch.profiler.record_function(f"ctxscale.step {n}"):
            yield
        self._recorded.append(n)
        if n == self.last:
            self.finish()

    def finish(self) -> None:
        """Stop and write the traces (also called at the end of a run inside the window)."""
        if self._prof is None:
            return
        if self._cuda():
            torch.cuda.synchronize(self.device)
        self._prof.__exit__(None, None, None)
        prof, self._prof = self._prof, None
        self.enabled = False
        if not self._recorded:
            return
        a, b = self._recorded[0], self._recorded[-1]
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"rank{self.rank}_steps{a}-{b}"
        trace = stem.with_suffix(".json")
        prof.export_chrome_trace(str(trace))
        sort = "self_device_time_total" if self._cuda() else "self_cpu_time_total"
        ops = self.folder / f"rank{self.rank}_ops.txt"
        ops.write_text(prof.key_averages().table(sort_by=sort, row_limit=TOP_OPS) + "\n")
        self.written = [trace, ops]
        if self.cfg.memory and self._cuda():
            snap = self.folder / f"rank{self.rank}_memory.pickle"
            torch.cuda.memory._dump_snapshot(str(snap))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(snap)
        if self.rank == 0:
            self.log(f"profile: steps {a}-{b} -> {trace} (and every rank's, ops table "
                     f"{ops.name})")
