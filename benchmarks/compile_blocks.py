"""`train.compile`: what the first compiled step costs and what a steady step gains, per model
family, against the same model eager in the same run; and the per-call cost of the `eager`
wrapper that keeps the kernel entry points out of the compiled graphs.

    python benchmarks/compile_blocks.py            # the five tiny configs; writes the results
    python benchmarks/compile_blocks.py --no-write

Each family: its `configs/<name>.yaml` model, one forward+backward of a (4, 128) batch; eager
median of 5 steps, then the blocks compiled (`compile_each_block`, as `train.compile` does): the
first step (compilation included; a fresh Inductor cache, so compilation is cold) and the
median of 5 more. One thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

# a cold compile: Inductor's on-disk cache would otherwise answer from an earlier run
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
import torch  # noqa: E402
from machine import cpu_name  # noqa: E402 (benchmarks/ is sys.path[0] as a script)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compile_blocks_cpu.md"
CONFIGS = ["tiny", "linear_tiny", "mamba_tiny", "mamba2_tiny", "titans_tiny", "hybrid_tiny"]


def _step(model, ids) -> float:
    t0 = time.perf_counter()
    model(ids, labels=ids).backward()
    return time.perf_counter() - t0


def _family(name: str, seq: int) -> tuple[float, float, float]:
    import torch._dynamo

    from ctxscale.dist.parallelize import compile_each_block
    from ctxscale.launch.config import load_job_config
    from ctxscale.models import build_model

    torch._dynamo.reset()
    cfg = load_job_config(ROOT / "configs" / f"{name}.yaml", ["model.vocab_size=256"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ids = torch.randint(0, 256, (4, seq))
    _step(model, ids)  # warm-up
    eager = statistics.median(_step(model, ids) for _ in range(5))
    compile_each_block(model)
    first = _step(model, ids)
    steady = statistics.median(_step(model, ids) for _ in range(5))
    return eager, first, steady


def _wrapper_cost() -> tuple[float, float]:
    from ctxscale.kernels.dispatch import eager

    def plain(x):
        return x

    wrapped, x, n = eager(plain), torch.zeros(1), 200_000
    out = []
    for fn in (plain, wrapped):
        t0 = time.perf_counter()
        for _ in range(n):
            fn(x)
        out.append((time.perf_counter() - t0) / n * 1e6)
    return out[0], out[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--no-write", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)
    lines = [f"# train.compile on the CPU, {cpu_name()}, 1 thread", "",
             f"`python benchmarks/compile_blocks.py`: one forward+backward of a (4, {a.seq}) batch "
             "per step; eager and compiled are the same model in the same run; the first "
             "compiled step starts from an empty Inductor cache.", "",
             "| config | eager step | first compiled step | compiled step | compiled / eager |",
             "|---|---|---|---|---|"]
    for name in CONFIGS:
        eager, first, steady = _family(name, a.seq)
        lines.append(f"| {name} | {eager * 1e3:.1f} ms | {first:.1f} s | {steady * 1e3:.1f} ms | "
                     f"{steady / eager:.2f}x |")
        print(lines[-1], flush=True)
    plain, wrapped = _wrapper_cost()
    lines += ["", f"`kernels.dispatch.eager` wrapper: {wrapped:.2f} us per call against "
              f"{plain:.2f} us for the plain function."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
