"""File-system helpers for the data cache: identities of input files, atomic writes, locks.

Cache entries are written to a temporary name in the same folder and renamed into place
(`os.replace` is atomic on POSIX), so a reader never sees a half-written file; an inter-process
lock (`fcntl.flock`) makes concurrent ranks build an entry once and then share it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

DEFAULT_CACHE_ENV = "CTXSCALE_CACHE_DIR"


def default_cache_dir() -> Path:
    env = os.environ.get(DEFAULT_CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "ctxscale" / "data"


def resolve_cache_dir(override: str | None, configured: str | None) -> Path:
    path = Path(override or configured or default_cache_dir()).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def run_cache_dir(output_dir: str | Path, configured: str | None) -> Path:
    """The data cache of a job writing to `output_dir`: `data.cache_dir` when set, else
    <output_dir>/cache (train, eval, convert and tokenize share it, so a tokenizer trained
    for a config is found by every command run with it)."""
    return Path(configured) if configured else Path(output_dir) / "cache"


def check_files(paths: list[str], key: str) -> list[Path]:
    """Resolve the files of config list `key`, raising FileNotFoundError that names a missing
    path."""
    out = []
    for p in paths:
        path = Path(p).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{key} entry {str(p)!r} does not exist or is not a file "
                f"(resolved to {path.resolve()}); fix the path in the data config"
            )
        out.append(path.resolve())
    return out


def file_identity(path: Path) -> dict:
    """What the cache key uses for an input file: resolved path, size and mtime (no content
    hash, so checking a large corpus stays instant; editing a file changes size or mtime)."""
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def key_of(obj) -> str:
    """Stable hex key of a JSON-serializable object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:24]


def tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = tmp_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def file_lock(path: Path):
    """Exclusive inter-process lock on `path` (created if needed). No-op where flock is absent."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
