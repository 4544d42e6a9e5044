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
