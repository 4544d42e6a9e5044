"""Kernel tests run the Triton kernels on CPU in the Triton interpreter.

Triton decides at decoration time (`@triton.jit`) whether a kernel is compiled or interpreted, so
`TRITON_INTERPRET=1` must be set before any module defining a kernel is imported. pytest loads this
file before the test modules of this folder; the Triton kernel modules are only imported from here
on (the dispatchers import them lazily). On a CUDA machine set TRITON_INTERPRET=0 to run the same
tests on the GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """Where the Triton tests run: the GPU when one is present and the interpreter is off."""
    if os.environ.get("TRITON_INTERPRET") != "1" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture
def real_autotune(monkeypatch):
    """Run launches through Triton's real `Autotuner` on CPU: every config the pruning keeps is
    "timed" by running the interpreted kernel three times (as `do_bench` does, with the
    autotuner's reset_to_zero / restore_value hooks around each run), then the winner runs once.
    The fake timings make the LAST config win, so a wrong result from a timed run that the hooks
    fail to undo shows up. Only on CPU (on a GPU the tests autotune for real anyway)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the interpreter autotune stand-in is for CPU runs")
    from triton.runtime.autotuner import Autotuner

    from ctxscale.kernels import triton_launch

    timed = []

    def do_bench(self, kernel_call, quantiles=None):
        for _ in range(3):
            kernel_call()
        timed.append(self)
        t = 1.0 / len(timed)  # later configs "run faster"
        return [t, t, t]

    monkeypatch.setattr(triton_launch, "INTERPRET", False)
    monkeypatch.delenv("CTXSCALE_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(Autotuner, "do_bench", do_bench)
    yield timed
    for tuner in set(timed):  # forget the choices, so other tests tune afresh
        tuner.cache.clear()
