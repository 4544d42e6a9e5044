"""kernels/dispatch.py: forcing one op's path from the environment or a config, and the errors
for names that are not paths (which used to run the default path silently for some ops)."""

import pytest
import torch

from ctxscale.kernels import attention, chosen_paths
from ctxscale.kernels.dispatch import OP_PATHS, forced_path, set_kernel_mode
from ctxscale.kernels.norm import rms_norm
from ctxscale.launch.config import JobConfig, KernelConfig


@pytest.fixture(autouse=True)
def _reset_overrides():
    yield
    set_kernel_mode(None)


@pytest.mark.parametrize("op", sorted(OP_PATHS))
def test_a_misspelt_path_in_the_environment_is_an_error(op, monkeypatch):
    var = f"CTXSCALE_KERNELS_{op.upper()}"
    monkeypatch.setenv(var, "trition")
    with pytest.raises(ValueError, match=f"{var}='trition' is not a path of {op}; choose one of"):
        forced_path(op)
    monkeypatch.setenv(var, f" {OP_PATHS[op][0].upper()} ")  # case and spaces are forgiven
    assert forced_path(op) == OP_PATHS[op][0]


def test_dispatchers_refuse_unknown_paths(monkeypatch):
    """attention and rms_norm ran their default path for any unknown value before."""
    q = torch.randn(1, 8, 2, 8)
    monkeypatch.setenv("CTXSCALE_KERNELS_ATTENTION", "flash")
    with pytest.raises(ValueError, match="choose one of"):
        attention(q, q, q)
    monkeypatch.setenv("CTXSCALE_KERNELS_RMS_NORM", "fused")
    with pytest.raises(ValueError, match="CTXSCALE_KERNELS_RMS_NORM='fused'"):
        rms_norm(q, torch.ones(8))


def test_config_override_wins_over_the_environment(monkeypatch):
    monkeypatch.setenv("CTXSCALE_KERNELS_ATTENTION", "reference")
    set_kernel_mode("auto", attention="blockwise", selective_scan=None)
    assert forced_path("attention") == "blockwise"
    assert forced_path("selective_scan") is None
    q = torch.randn(1, 8, 2, 8)
    attention(q, q, q)
    assert chosen_paths()["attention"] == "blockwise"
    set_kernel_mode(None)
    assert forced_path("attention") == "reference"
    assert chosen_paths() == {}  # a new job's summary lists only what it runs


def test_set_kernel_mode_checks_ops_and_paths():
    with pytest.raises(ValueError, match="kernels.attn: no kernel op 'attn'"):
        set_kernel_mode("auto", attn="sdpa")
    with pytest.raises(ValueError, match="kernels.conv1d='triton' is not a path of conv1d"):
        set_kernel_mode("auto", conv1d="triton")
    assert forced_path("conv1d") is None  # a refused call changes nothing


def test_torch_means_the_pytorch_paths_chosen_as_on_cpu(monkeypatch):
    monkeypatch.setenv("CTXSCALE_KERNELS_ATTENTION", "torch")
    q = torch.randn(1, 8, 2, 8)
    attention(q, q, q)
    assert chosen_paths()["attention"] == "sdpa"
    attention(q, q, q, return_lse=True)
    assert chosen_paths()["attention"] == "blockwise"


def test_job_config_checks_every_op_path():
    cfg = JobConfig()
    cfg.kernels = KernelConfig(selective_scan="mamba")
    with pytest.raises(ValueError, match="kernels.selective_scan='mamba' is not a path"):
        cfg.validate()
    cfg.kernels = KernelConfig(selective_scan="mamba_ssm", cross_entropy="triton")
    cfg.validate()
    assert cfg.kernels.per_op() == {op: None for op in OP_PATHS} | {
        "selective_scan": "mamba_ssm", "cross_entropy": "triton"}
