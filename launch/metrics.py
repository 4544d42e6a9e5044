"""Metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard scalars, progress bar.

Only the logging rank (global rank 0) writes. Every logged record has at least `step`, `loss`,
`lr`, `grad_norm` and `tokens_per_s`; evaluation records carry `eval_loss` and, for tasks with
answers, `eval_accuracy`.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, enabled: bool, tensorboard: bool,
                 progress_total: int | None = None, progress: bool = False, initial: int = 0):
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))
            except ImportError:
                self._tb = None
        if progress and progress_total:
            from tqdm import tqdm

            self._bar = tqdm(total=progress_total, initial=initial, desc="train", unit="step",
                             dynamic_ncols=True)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in record.items()}
        self._file.write(json.dumps(clean) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self._tb.add_scalar(key, value, step)

    def progress(self, n: int = 1, **postfix) -> None:
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)

    def write(self, text: str) -> None:
        if self.enabled:
            if self._bar is not None:
                self._bar.write(text)
            else:
                print(text, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
