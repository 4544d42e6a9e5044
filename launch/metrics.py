"""Metrics: `metrics.jsonl` (one JSON object per logged step), TensorBoard scalars, progress bar.

Only the logging rank (global rank 0) writes. Every logged record has at least `step`, `loss`,
`lr`, `grad_norm` and `tokens_per_s`, and `tflops` (model TFLOP/s per device) with `mfu` (% of
the device's peak, where known: `device_peak_flops`); evaluation records carry `eval_loss` and,
for tasks with answers, `eval_accuracy`.
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path

import torch

# Dense bfloat16 tensor-core peaks (FLOP/s) by device-name substring, first match wins.
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989.5e12), ("H200", 989.5e12),
    ("H800", 989.5e12), ("GH200", 989.5e12), ("B200", 2250e12), ("A100", 312e12),
    ("A800", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("A10G", 70e12),
]
PEAK_ENV = "CTXSCALE_PEAK_TFLOPS"


def device_peak_flops(device: torch.device, dtype: str) -> float | None:
    """Peak FLOP/s of one device for MFU: `CTXSCALE_PEAK_TFLOPS` if set (any device), else the
    dense bf16 peak of a known CUDA GPU when training in bfloat16; None when unknown (CPU, a
    float32 run, another GPU)."""
    import os

    env = os.environ.get(PEAK_ENV)
    if env:
        try:
            return float(env) * 1e12
        except ValueError:
            raise ValueError(f"{PEAK_ENV}={env!r} must be a number of TFLOP/s per device") from None
    if device.type != "cuda" or dtype != "bfloat16":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None)


def throughput(flops_per_token: float, tokens_per_s: float, world_size: int,
               peak: float | None) -> dict:
    """Model TFLOP/s per device (6N + attention per token, recomputation not counted, the
    work taken as evenly split over the ranks) and, with a known peak, MFU in percent."""
    tflops = flops_per_token * tokens_per_s / world_size / 1e12
    return {"tflops": tflops, **({"mfu": 100 * tflops * 1e12 / peak} if peak else {})}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated bytes on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _wandb_run(output_dir: Path, *, project: str, name: str, config: dict):
    """A W&B run for this output folder: the id saved in <output_dir>/wandb_run_id, so that a
    resumed job logs into the same run (resume="allow")."""
    import uuid

    import wandb

    id_file = output_dir / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:16]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=name, id=run_id, resume="allow", config=config,
                      dir=str(output_dir))


class MetricsLogger:
    def __init__(self, output_dir: str | Path, *, enabled: bool, tensorboard: bool,
                 progress_total: int | None = None, progress: bool = False, initial: int = 0,
                 wandb: dict | None = None):
        """`wandb`: {"project", "name", "config"} to log to Weights & Biases as well."""
        self.enabled = enabled
        self.path = Path(output_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._bar = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        if wandb is not None:
            self._wandb = _wandb_run(Path(output_dir), **wandb)
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
        scalars = {k: v for k, v in clean.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])

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
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        if self._file is not None:
            self._file.close()
