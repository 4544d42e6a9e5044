"""Kernel path selection shared by every dispatcher in `ctxscale.kernels`.

`CTXSCALE_KERNELS=torch|triton|auto` picks the family of paths for every op (default `auto`:
Triton on CUDA, PyTorch on CPU). `CTXSCALE_KERNELS_<OP>=<path>` (for example
`CTXSCALE_KERNELS_ATTENTION=blockwise`) forces one named path of one op, for tests and
comparisons. `set_kernel_mode()` does the same from a training config (`kernels.<op>`), and wins
over the environment. The ops and their paths are `OP_PATHS`; any other name is a ValueError that
lists them. Every dispatcher logs the
path it chose once per (op, path, reason), so a run says which code actually ran.
"""

from __future__ import annotations

import importlib
import logging
import os

import torch

logger = logging.getLogger("ctxscale.kernels")

MODES = ("auto", "torch", "triton")
# The paths each op's dispatcher can be forced onto (`CTXSCALE_KERNELS_<OP>` or config
# `kernels.<op>`). `torch` means "the PyTorch paths, chosen as on CPU" for every op.
OP_PATHS: dict[str, tuple[str, ...]] = {
    "attention": ("reference", "blockwise", "sdpa", "flash_attn", "triton", "torch"),
    "linear_attention": ("recurrent", "chunked", "triton", "torch"),
    "selective_scan": ("reference", "chunked", "triton", "mamba_ssm", "torch"),
    "conv1d": ("reference", "torch", "causal_conv1d"),
    "rms_norm": ("torch", "triton"),
    "cross_entropy": ("torch", "triton"),
}
_mode_override: str | None = None
_op_overrides: dict[str, str] = {}
_logged: set[tuple[str, str]] = set()
_chosen: dict[str, str] = {}


def check_op_path(op: str, path: str, source: str) -> str:
    """`path` normalized, or a ValueError naming `source` (where the value came from) and the
    choices when `op` has no such path or there is no such op."""
    if op not in OP_PATHS:
        raise ValueError(f"{source}: no kernel op {op!r}; the ops are {sorted(OP_PATHS)}")
    value = path.strip().lower()
    if value not in OP_PATHS[op]:
        raise ValueError(
            f"{source}={path!r} is not a path of {op}; choose one of {OP_PATHS[op]} or unset it"
        )
    return value


def set_kernel_mode(mode: str | None = None, **per_op: str | None) -> None:
    """Set the kernel family (`auto`, `torch`, `triton`) and per-op paths from code or config
    (`set_kernel_mode("auto", attention="sdpa")`); None leaves an op to the family rule. Every
    job starts with it, so it also forgets the paths earlier jobs of this process ran
    (`chosen_paths` then reports this job's)."""
    global _mode_override
    if mode is not None and mode not in MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {MODES}")
    checked = {op: check_op_path(op, v, f"kernels.{op}") for op, v in per_op.items() if v}
    _mode_override = mode
    _op_overrides.clear()
    _op_overrides.update(checked)
    _chosen.clear()


def kernel_mode() -> str:
    mode = _mode_override or os.environ.get("CTXSCALE_KERNELS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(
            f"CTXSCALE_KERNELS={mode!r} is not one of {MODES}; unset it or pick one of those"
        )
    return mode


def forced_path(op: str) -> str | None:
    """The path forced for `op` by `set_kernel_mode(op=...)` (a config's `kernels.<op>`) or else
    `CTXSCALE_KERNELS_<OP>`; a ValueError for a value that is not one of `OP_PATHS[op]`."""
    if op in _op_overrides:
        return _op_overrides[op]
    var = f"CTXSCALE_KERNELS_{op.upper()}"
    value = os.environ.get(var, "").strip()
    return check_op_path(op, value, var) if value else None


def triton_runnable(device: torch.device) -> bool:
    """Triton kernels run on CUDA, or on CPU in the interpreter (`TRITON_INTERPRET=1`). They also
    take `meta` tensors while `ctxscale.kernels.triton_compile` compiles them for a GPU that is not
    here (nothing is launched then)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if device.type == "cuda":
        return True
    if device.type == "meta":
        return _compile_only_gpu is not None
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


# Set by ctxscale.kernels.triton_compile while it compiles without launching: the properties of
# the GPU it compiles for, {"sms": ..., "smem_block": ...} (None otherwise).
_compile_only_gpu: dict | None = None


def multiprocessor_count(device: torch.device) -> int:
    """Streaming multiprocessors of `device` (kernels size persistent grids by it); 4 on CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    if device.type == "meta" and _compile_only_gpu is not None:
        return _compile_only_gpu["sms"]
    return 4


def shared_memory_per_block(device: torch.device) -> int:
    """The most shared memory one thread block may use on `device` (the opt-in maximum, 1 KiB
    under the per-SM size: 227 KiB on H100 / H200, 163 KiB on A100), in bytes; autotuned
    kernels drop the configs that would not fit. Unlimited off CUDA (the interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).shared_memory_per_multiprocessor - 1024
    if device.type == "meta" and _compile_only_gpu is not None:
        return _compile_only_gpu["smem_block"]
    return 1 << 30


def want_triton(device: torch.device) -> bool:
    """Whether the family setting asks for Triton on this device."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    if mode == "triton":
        if not triton_runnable(device):
            raise RuntimeError(
                "CTXSCALE_KERNELS=triton but Triton cannot run here: it needs a CUDA device, or "
                "TRITON_INTERPRET=1 on CPU. Unset CTXSCALE_KERNELS to use the PyTorch paths."
            )
        return True
    return device.type == "cuda" and triton_runnable(device)


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def eager(fn):
    """Run `fn` (a kernel entry point) eagerly inside `torch.compile` (`train.compile`): a clean
    graph break around it, instead of Dynamo tracing the dispatch, the Triton launches and
    autotuning, the host-side block planning and the context-parallel exchanges (which either
    break the graph at an arbitrary point or recompile for every shape and flag)."""
    return torch.compiler.disable(fn, recursive=True)


def log_choice(op: str, path: str, reason: str = "") -> None:
    """Record (and log once) which path `op` ran. Not while `torch.compile` traces (a log call
    breaks the graph, and a changed record recompiles it): the paths there are fixed
    (`compile_each_block` records them)."""
    if torch.compiler.is_compiling():
        return
    _chosen[op] = path
    key = (op, path)
    if key not in _logged:
        _logged.add(key)
        logger.info("kernel %s -> %s%s", op, path, f" ({reason})" if reason else "")


def chosen_paths() -> dict[str, str]:
    """The last path each op ran, e.g. `{'attention': 'sdpa', 'rms_norm': 'torch'}`."""
    return dict(_chosen)
