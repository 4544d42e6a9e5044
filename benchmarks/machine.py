"""The machine a benchmark ran on, for the header of its results, and the layer timing loop
(shared by the scripts here; they run as `python benchmarks/X.py`, so this folder is on
sys.path)."""

import platform
import time
from pathlib import Path


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (falls back to `platform.processor()`)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def best_fwd_bwd(layer, x, *args, repeats: int) -> float:
    """Best wall seconds of `layer(x, *args).square().mean().backward()` over `repeats` runs
    after one warm-up run; gradients are cleared between runs."""
    best = float("inf")
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        layer(x, *args).square().mean().backward()
        if i:  # run 0 warms up
            best = min(best, time.perf_counter() - t0)
        x.grad = None
        layer.zero_grad(set_to_none=True)
    return best
