"""What the autotuned Triton kernel modules share: the launch rule and the dot-product precision.

Under the CPU interpreter (`TRITON_INTERPRET=1`, which Triton reads when a kernel is decorated)
a kernel runs with fixed small blocks, so tests are fast and still split their shapes into
several blocks; on CUDA the `triton.autotune` wrapper picks the blocks by timing.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def autotune_enabled() -> bool:
    """`CTXSCALE_TRITON_AUTOTUNE=0` runs each kernel with the first config its pruning keeps
    instead of timing them all: one compile per specialization (GPU test runs, quick jobs)."""
    return os.environ.get("CTXSCALE_TRITON_AUTOTUNE", "1").strip() != "0"


def check_reset_buffers(tuned, args) -> None:
    """The autotuner zeroes its `reset_to_zero` arguments before it times each config: such a
    buffer must not share memory with any other tensor argument, or a result (or an input) is
    wiped on a GPU's first call. Checked on every launch, so the interpreter tests catch it."""
    resets = getattr(tuned, "reset_to_zero", ())
    if not resets:
        return
    named = dict(zip(tuned.arg_names, args))
    for name in resets:
        buf = named.get(name)
        if not isinstance(buf, torch.Tensor) or buf.device.type == "meta":
            continue
        lo = buf.untyped_storage().data_ptr()
        hi = lo + buf.untyped_storage().nbytes()
        for other_name, other in named.items():
            if other_name != name and isinstance(other, torch.Tensor) and other.numel():
                start = other.untyped_storage().data_ptr()
                assert not (start < hi and lo < start + other.untyped_storage().nbytes()), (
                    f"autotune reset buffer {name} aliases argument {other_name}")


def launch(kernel, tuned, grid_fn, interpret_meta: dict, *args, **kwargs) -> None:
    """Run `kernel[grid]` with `interpret_meta` (block sizes, num_warps) under the interpreter,
    else the autotuned `tuned[grid]`. `grid_fn(meta)` maps the chosen block sizes to the grid."""
    check_reset_buffers(tuned, args)
    if INTERPRET:
        kernel[grid_fn(interpret_meta)](*args, **kwargs, **interpret_meta)
    elif autotune_enabled():
        tuned[grid_fn](*args, **kwargs)
    else:
        tuned.nargs = dict(zip(tuned.arg_names, args))
        try:
            config = tuned.prune_configs(kwargs)[0]
        finally:
            tuned.nargs = None
        kernel[grid_fn(config.kwargs)](*args, **kwargs, **config.all_kwargs())


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of tl.dot: float32 inputs follow torch's TF32 switch for matmuls (off by
    default: exact IEEE float32); 16-bit inputs ignore it (tensor cores, float32 accumulation)."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"
