"""`launch.env.tune_cpu_allocator`: glibc mallopt (mmap off, high trim threshold) so large
activations are reused instead of mmap'd and page-faulted every step.

Each case runs in a fresh interpreter (the tuning is process-wide and idempotent). The checks:
the default mode tunes glibc (this machine is Linux/glibc), CTXSCALE_CPU_MALLOC=system leaves it
alone, a wrong value is a clear error, and a 64 MiB block comes from the heap after tuning but
from its own mmap without it. glibc marks an mmap'd chunk with the IS_MMAPPED bit (0x2) of the
size word just before the pointer (malloc/malloc.c), which is what the probe reads.
"""

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from ctxscale.launch.env import tune_cpu_allocator
tuned = tune_cpu_allocator()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
a = libc.malloc(64 << 20)
header = ctypes.c_size_t.from_address(a - ctypes.sizeof(ctypes.c_size_t)).value
libc.free(a)
print(int(tuned), int(bool(header & 0x2)))
"""


def _probe(mode: str | None):
    env = {k: v for k, v in os.environ.items() if k != "CTXSCALE_CPU_MALLOC"}
    if mode is not None:
        env["CTXSCALE_CPU_MALLOC"] = mode
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_default_mode_reuses_large_blocks():
    r = _probe(None)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["1", "0"]  # tuned; the 64 MiB block is not mmap'd


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_system_mode_mmaps_large_blocks():
    r = _probe("system")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["0", "1"]  # glibc default: one mmap per large allocation


def test_wrong_mode_is_a_clear_error():
    r = _probe("jemalloc")
    assert r.returncode != 0
    assert "CTXSCALE_CPU_MALLOC='jemalloc' must be 'reuse' (default) or 'system'" in r.stderr
