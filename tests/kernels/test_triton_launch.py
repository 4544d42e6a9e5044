"""kernels/triton_launch.py: the launch rule (interpreter tiles, autotune, or the first config
the pruning keeps when CTXSCALE_TRITON_AUTOTUNE=0), with stand-in kernels that record calls."""

import pytest
import torch
import triton

from ctxscale.kernels import triton_launch


class _Kernel:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


class _Tuned(_Kernel):
    arg_names = ["X", "n"]

    def __init__(self, configs):
        super().__init__()
        self.configs = configs
        self.nargs = None
        self.pruned_with = None

    def prune_configs(self, kwargs):
        self.pruned_with = dict(self.nargs)
        return [c for c in self.configs if c.kwargs["BLOCK"] <= self.nargs["n"]]


def _setup():
    configs = [triton.Config({"BLOCK": 128}, num_warps=8, num_stages=3),
               triton.Config({"BLOCK": 32}, num_warps=2, num_stages=2)]
    return _Kernel(), _Tuned(configs), lambda meta: (100 // meta["BLOCK"],)


def test_autotuned_launch_by_default(monkeypatch):
    monkeypatch.setattr(triton_launch, "INTERPRET", False)
    monkeypatch.delenv("CTXSCALE_TRITON_AUTOTUNE", raising=False)
    kernel, tuned, grid = _setup()
    triton_launch.launch(kernel, tuned, grid, {"BLOCK": 16}, "x", 64, FLAG=True)
    assert kernel.calls == [] and tuned.calls == [(grid, ("x", 64), {"FLAG": True})]


def test_no_autotune_runs_the_first_config_the_pruning_keeps(monkeypatch):
    monkeypatch.setattr(triton_launch, "INTERPRET", False)
    monkeypatch.setenv("CTXSCALE_TRITON_AUTOTUNE", "0")
    kernel, tuned, grid = _setup()
    triton_launch.launch(kernel, tuned, grid, {"BLOCK": 16}, "x", 64, FLAG=True)
    assert tuned.calls == [] and tuned.pruned_with == {"X": "x", "n": 64} and tuned.nargs is None
    (g, args, kwargs), = kernel.calls
    assert g == (3,) and args == ("x", 64)  # BLOCK=128 was pruned (> n): 100 // 32 programs
    want = {"FLAG": True, "BLOCK": 32, "num_warps": 2, "num_stages": 2}
    assert {k: kwargs[k] for k in want} == want


def test_interpreter_uses_the_fixed_meta(monkeypatch):
    monkeypatch.setattr(triton_launch, "INTERPRET", True)
    kernel, tuned, grid = _setup()
    triton_launch.launch(kernel, tuned, grid, {"BLOCK": 16, "num_warps": 1}, "x", 64)
    assert tuned.calls == [] and kernel.calls == [((6,), ("x", 64), {"BLOCK": 16, "num_warps": 1})]


def test_reset_buffer_must_not_alias_another_argument():
    """The autotuner zeroes reset_to_zero buffers before timing: a stand-in buffer that shares
    memory with a result would wipe it on a GPU's first call (it did: linear attention's decay
    gradient buffer stood in for the initial-state gradient when there was no decay)."""
    tuned = _Tuned([])
    tuned.arg_names, tuned.reset_to_zero = ["OUT", "PART"], ["PART"]
    out = torch.zeros(8)
    triton_launch.check_reset_buffers(tuned, (out, torch.zeros(4)))
    with pytest.raises(AssertionError, match="PART aliases argument OUT"):
        triton_launch.check_reset_buffers(tuned, (out, out[2:]))
