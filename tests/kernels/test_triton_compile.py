"""kernels/triton_compile.py: every Triton kernel compiles for sm_90 (H100/H200) on this CPU
machine, through the wrappers a GPU run takes, within the GPU's limits and without spills.

Each check runs `python -m ctxscale.kernels.triton_compile` in its own process with
TRITON_INTERPRET=0 (this folder's conftest sets 1, and Triton decides at import time whether a
kernel compiles or interprets). The two processes run side by side to halve the wall time.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
EXPECTED = {
    "attention": {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"},
    "linear_attention": {"_la_sweep_kernel", "_la_out_kernel", "_la_bwd_dqdk_kernel",
                         "_la_bwd_dv_kernel"},
    "selective_scan": {"_ss_fwd_kernel", "_ss_bwd_kernel"},
    "rms_norm": {"_rms_fwd_kernel", "_rms_bwd_kernel"},
    "cross_entropy": {"_ce_rows_kernel"},
}


@pytest.fixture(scope="module")
def sm90(tmp_path_factory):
    """Rows of both compile runs (bf16, head dim 128, seq 8192) for sm_90."""
    tmp = tmp_path_factory.mktemp("sm90")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "TRITON_CACHE_DIR": str(tmp / "cache")}
    groups = [["attention"], ["linear_attention", "selective_scan", "rms_norm", "cross_entropy"]]
    procs = []
    for i, ops in enumerate(groups):
        cmd = [sys.executable, "-m", "ctxscale.kernels.triton_compile", "--arch", "90",
               "--head-dims", "128", "--json", str(tmp / f"{i}.json"), "--ops", *ops]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    rows = []
    for i, p in enumerate(procs):
        out, _ = p.communicate(timeout=600)
        path = tmp / f"{i}.json"
        assert path.exists(), f"triton_compile wrote no rows (rc {p.returncode}):\n{out[-4000:]}"
        rows += json.loads(path.read_text())
    return rows


def test_every_kernel_compiles_within_limits(sm90):
    errors = [(r["kernel"], r["config"], r["error"]) for r in sm90 if r["error"]]
    assert not errors, errors
    seen = {}
    for r in sm90:
        seen.setdefault(r["op"], set()).add(r["kernel"])
    assert seen == EXPECTED
    too_big = [(r["kernel"], r["config"], r["shared_bytes"], r["registers"]) for r in sm90
               if not r["fits"]]
    assert not too_big, f"over sm_90's 227 KiB shared memory or 255 registers: {too_big}"


def test_no_register_spills(sm90):
    spills = [(r["kernel"], r["config"], r["num_warps"], r["local_bytes"]) for r in sm90
              if r["local_bytes"]]
    assert not spills, f"local memory (spills) in: {spills}"


def test_attention_uses_hopper_tensor_cores(sm90):
    """bf16 attention on sm_90: every forward and dk/dv config lowers tl.dot to wgmma; the dq
    kernel has at least one wgmma config (its BLOCK_M = 32 configs fall back to mma.sync, which
    wgmma's 64-row minimum forbids)."""
    att = [r for r in sm90 if r["op"] == "attention"]
    for kernel in ("_fwd_kernel", "_bwd_dkdv_kernel"):
        kinds = {r["mma"] for r in att if r["kernel"] == kernel}
        assert kinds == {"wgmma"}, (kernel, kinds)
    dq = {r["mma"] for r in att if r["kernel"] == "_bwd_dq_kernel"}
    assert "wgmma" in dq and dq <= {"wgmma", "mma.sync"}, dq
    # the fixed-size delta pre-pass has no dot product
    assert {r["mma"] for r in att if r["kernel"] == "_bwd_delta_kernel"} == {"-"}


def test_linear_attention_uses_hopper_tensor_cores(sm90):
    """bf16 linear attention: every product runs on tensor cores (no float32 FMA path). The
    chunk-parallel kernels use wgmma in every config; the state sweeps' 32-row blocks (there for
    parallelism when batch·heads is small) are below wgmma's 64-row minimum and use mma.sync."""
    rows = [r for r in sm90 if r["op"] == "linear_attention"]
    for r in rows:
        want = {"mma.sync"} if r["config"].startswith("C=64, BK=32") else {"wgmma"}
        assert r["mma"] in want, (r["kernel"], r["config"], r["mma"])
