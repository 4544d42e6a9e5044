"""Where am I running? torchrun, Slurm, MPI or a single process -> rank, world size, process group.

Detection order:
1. torchrun / torch.distributed.run (also `srun torchrun ...`): RANK, WORLD_SIZE, LOCAL_RANK and
   MASTER_ADDR/PORT are set by the launcher.
2. Slurm (`srun python -m ctxscale.launch.train ...`): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID;
   the master address is the first host of the job's node list (`scontrol show hostnames`), the
   port is derived from the job id unless MASTER_PORT is set.
3. MPI (`mpirun -n 4 python -m ctxscale.launch.train ...`, Open MPI / MPICH / Intel MPI): rank,
   size and local rank from mpi4py's COMM_WORLD; rank 0 broadcasts its host and a free port.
4. Otherwise a single process.

Backend: NCCL on CUDA, gloo on CPU. Knobs (environment): CTXSCALE_DIST_TIMEOUT (seconds, default
1800), and the usual NCCL ones (NCCL_DEBUG=WARN, NCCL_ASYNC_ERROR_HANDLING /
TORCH_NCCL_ASYNC_ERROR_HANDLING=1 so a hung collective aborts instead of hanging, NCCL_IB_* /
NCCL_SOCKET_IFNAME for the fabric), GLOO_SOCKET_IFNAME for gloo.

CPU allocator: glibc serves every allocation above its mmap threshold (at most 32 MiB) with a
fresh mmap and returns it with munmap on free, so a training step whose activations are larger
than that pays page faults and page zeroing for every such tensor, every step: at 256K tokens this
made a linear-attention layer's time per token 1.46x that at 4K
(benchmarks/recurrent_layers_scaling.py). `tune_cpu_allocator()` (called when a job picks the
CPU) turns glibc's mmap path off and raises its trim threshold, so freed blocks are reused like
small ones (time per token then flat from 4K to 256K). CTXSCALE_CPU_MALLOC=system keeps glibc's
defaults (e.g. when jemalloc / tcmalloc is preloaded).
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launcher: str = "single"
    master_addr: str = "127.0.0.1"
    master_port: int = 29500


def _int_env(name: str, default: int | None = None) -> int | None:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def slurm_master_addr(nodelist: str) -> str:
    """First host of a Slurm node list ("node[01-04],gpu7" -> "node01"), via scontrol."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
            check=True, timeout=30,
        ).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = nodelist.split(",")[0]
    if "[" in head:  # node[01-04] -> node01 without scontrol
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def _slurm_tasks_per_node() -> int:
    # SLURM_TASKS_PER_NODE looks like "2(x3)" or "2,1"; take this job's first entry.
    value = os.environ.get("SLURM_NTASKS_PER_NODE") or os.environ.get("SLURM_TASKS_PER_NODE", "1")
    first = value.split(",")[0].split("(")[0]
    return int(first) if first.isdigit() else 1


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _mpi_env() -> DistEnv:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError(
            "launched under MPI but mpi4py is not installed or cannot load libmpi: "
            "pip install 'ctxscale[mpi]' and make sure an MPI library (e.g. Debian's "
            "libopenmpi-dev) is installed"
        ) from e
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    addr_port = None
    if comm.Get_rank() == 0:
        addr = os.environ.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        addr_port = (addr, _int_env("MASTER_PORT") or _free_port())
    addr, port = comm.bcast(addr_port, root=0)
    return DistEnv(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size(), "mpi",
                   addr, port)


def detect_env() -> DistEnv:
    if _int_env("RANK") is not None and _int_env("WORLD_SIZE") is not None:
        return DistEnv(
            rank=_int_env("RANK"), world_size=_int_env("WORLD_SIZE"),
            local_rank=_int_env("LOCAL_RANK", 0),
            local_world_size=_int_env("LOCAL_WORLD_SIZE", 1),
            launcher="torchrun", master_addr=os.environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env("MASTER_PORT", 29500),
        )
    if _int_env("SLURM_PROCID") is not None and _int_env("SLURM_NTASKS", 1) > 1:
        job = _int_env("SLURM_JOB_ID", 0)
        return DistEnv(
            rank=_int_env("SLURM_PROCID"), world_size=_int_env("SLURM_NTASKS"),
            local_rank=_int_env("SLURM_LOCALID", 0),
            local_world_size=_slurm_tasks_per_node(),
            launcher="slurm",
            master_addr=os.environ.get("MASTER_ADDR")
            or slurm_master_addr(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=_int_env("MASTER_PORT") or 20000 + job % 20000,
        )
    if any(os.environ.get(v) for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return _mpi_env()
    return DistEnv()


def init_distributed(env: DistEnv, device_type: str) -> None:
    """Initialize the default process group (no-op for a single process)."""
    if env.world_size == 1 or dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    backend = "nccl" if device_type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=float(os.environ.get("CTXSCALE_DIST_TIMEOUT", "1800")))
    kwargs = {}
    if device_type == "cuda":
        kwargs["device_id"] = torch.device("cuda", env.local_rank)
    dist.init_process_group(
        backend, rank=env.rank, world_size=env.world_size, timeout=timeout,
        init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        if env.launcher in ("slurm", "mpi") else "env://", **kwargs,
    )


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc mallopt parameters (malloc.h)
_allocator_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Make glibc reuse large freed blocks instead of mmap/munmap per tensor (module docstring).
    Idempotent; returns whether the tuning is in effect (False off glibc or when
    CTXSCALE_CPU_MALLOC=system)."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    mode = os.environ.get("CTXSCALE_CPU_MALLOC", "reuse")
    if mode not in ("reuse", "system"):
        raise ValueError(f"CTXSCALE_CPU_MALLOC={mode!r} must be 'reuse' (default) or 'system'")
    if mode == "system" or not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None)  # the process's own C library
    if not hasattr(libc, "gnu_get_libc_version"):
        return False  # not glibc (musl): its allocator has no such knobs
    mallopt = libc.mallopt
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _allocator_tuned = ok
    logging.getLogger("ctxscale.env").info("CPU allocator: glibc mmap off, trim threshold 2 GiB (%s)",
                                           "on" if ok else "mallopt refused")
    return ok


def pick_device(requested: str, env: DistEnv) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    tune_cpu_allocator()
    return torch.device("cpu")
