"""Start a real one-node Slurm cluster (slurmctld + slurmd + munged) on this machine, for tests.

Needs Debian's `slurm-wlm` and `munge` (installed by `.ci/sysdeps.sh`) and root. Everything it
writes lives in one temporary folder; `SLURM_CONF` points clients (sbatch, scontrol) at it.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

NEEDED = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged")


def unavailable_reason() -> str | None:
    missing = [tool for tool in NEEDED if shutil.which(tool) is None]
    if missing:
        return f"Slurm tools not installed ({', '.join(missing)}); run `make sysdeps` as root"
    if os.geteuid() != 0:
        return "starting a local Slurm cluster needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, root: Path, cpus: int | None = None):
        self.root = Path(root)
        self.host = socket.gethostname().split(".")[0]
        self.cpus = cpus or os.cpu_count() or 1
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        self._procs: list[subprocess.Popen] = []

    def _write_conf(self) -> None:
        for sub in ("state", "spool", "munge"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        mem_mb = 4096
        self.conf.write_text(f"""
ClusterName=ctxscaletest
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={self.root}/munge/munge.socket
CredType=cred/munge
StateSaveLocation={self.root}/state
SlurmdSpoolDir={self.root}/spool
SlurmctldPidFile={self.root}/slurmctld.pid
SlurmdPidFile={self.root}/slurmd.pid
SlurmctldLogFile={self.root}/slurmctld.log
SlurmdLogFile={self.root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
ReturnToService=2
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MinJobAge=3600
NodeName={self.host} CPUs={self.cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE
""".lstrip())

    def start(self, timeout: float = 60.0) -> None:
        self._write_conf()
        sock = self.root / "munge" / "munge.socket"
        subprocess.run(
            ["munged", "--force", f"--socket={sock}", f"--pid-file={self.root}/munge/munged.pid",
             f"--log-file={self.root}/munge/munged.log", f"--seed-file={self.root}/munge/seed"],
            check=True, env=self.env, capture_output=True, timeout=30,
        )
        for daemon in (["slurmctld", "-D", "-i", "-f", str(self.conf)],
                       ["slurmd", "-D", "-f", str(self.conf)]):
            log = open(self.root / f"{daemon[0]}.stdout", "w")
            self._procs.append(subprocess.Popen(daemon, env=self.env, stdout=log,
                                                stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env,
                                 capture_output=True, text=True).stdout.strip()
            if out in ("idle", "mixed", "allocated"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"local Slurm did not become ready: {self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.stdout", "slurmd.stdout"):
            p = self.root / name
            if p.exists():
                parts.append(f"--- {name}\n{p.read_text()[-3000:]}")
        return "\n".join(parts)

    def submit(self, script: str, *args: str, cwd: str, sbatch_args: tuple = (),
               extra_env: dict | None = None) -> str:
        env = dict(self.env, **(extra_env or {}))
        out = subprocess.run(["sbatch", "--parsable", *sbatch_args, script, *args], cwd=cwd, env=env,
                             capture_output=True, text=True, check=True).stdout
        return out.strip().split(";")[0]

    def job_state(self, job_id: str) -> dict:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env,
                             capture_output=True, text=True).stdout
        fields = {}
        for token in out.split():
            if "=" in token:
                k, v = token.split("=", 1)
                fields[k] = v
        return fields

    def wait(self, job_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                         "NODE_FAIL", "OUT_OF_MEMORY"):
                return state
            time.sleep(1.0)
        subprocess.run(["scancel", job_id], env=self.env)
        raise TimeoutError(f"job {job_id} did not finish in {timeout}s: {self.job_state(job_id)}")

    def stop(self) -> None:
        for p in self._procs:
            p.terminate()
        for p in self._procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        pid_file = self.root / "munge" / "munged.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (ValueError, ProcessLookupError):
                pass
