"""Keep a source checkout's top-level folders from shadowing installed packages of the same name.

ctxscale's packages sit at the repository root (`kernels/`, `dist/`, `models/`, `launch/`), mapped
to `ctxscale.*` by pyproject.toml. Whenever the root is on `sys.path` (pytest, which imports
`tests.*` from it; `python -m ...` or `torchrun -m ...` started in the checkout), a plain
`import kernels` would find our folder before an installed distribution of that name: transformers
>= 5.25 requires Hugging Face's `kernels` package and runs `from kernels import CUDAProperties`,
which then failed in 28 tests. `install()` gives the root entry of `sys.path` a finder that skips
those four names, so `import kernels` finds the installed package (or nothing), while everything
else at the root (`tests`, `benchmarks`) and every `ctxscale.*` import resolve as before. An
installed (non-editable) ctxscale has no source root, and `install()` does nothing.
"""

import importlib.machinery
import os
import sys
from pathlib import Path

PACKAGE_DIRS = ("kernels", "dist", "models", "launch")


def source_root() -> Path | None:
    """The repository root when ctxscale runs from its source tree, else None."""
    root = Path(__file__).resolve().parents[1]
    if (root / "pyproject.toml").is_file() and all(
        (root / name / "__init__.py").is_file() for name in PACKAGE_DIRS
    ):
        return root
    return None


class _RootFinder(importlib.machinery.FileFinder):
    """The standard finder for the root folder, minus the package folders' top-level names."""

    def find_spec(self, fullname, target=None):
        if fullname in PACKAGE_DIRS:
            return None
        return super().find_spec(fullname, target)


def _loaders():
    m = importlib.machinery
    return (
        (m.ExtensionFileLoader, m.EXTENSION_SUFFIXES),
        (m.SourceFileLoader, m.SOURCE_SUFFIXES),
        (m.SourcelessFileLoader, m.BYTECODE_SUFFIXES),
    )


def _is_root(entry: str, root: Path) -> bool:
    try:
        return Path(entry or os.getcwd()).resolve() == root
    except (OSError, ValueError):
        return False


def install() -> None:
    """Idempotent: hook `sys.path` entries that name the source root (`''` counts when the working
    directory is the root) and drop the finders already cached for them."""
    root = source_root()
    if root is None or any(getattr(h, "_ctxscale_root", None) == root for h in sys.path_hooks):
        return

    def hook(entry: str):
        if not _is_root(entry, root):
            raise ImportError("not the ctxscale source root")  # the next hook takes the entry
        return _RootFinder(entry, *_loaders())

    hook._ctxscale_root = root
    sys.path_hooks.insert(0, hook)
    for entry in [e for e in sys.path_importer_cache if _is_root(e, root)]:
        del sys.path_importer_cache[entry]
    for name in PACKAGE_DIRS:
        module = sys.modules.get(name)
        origin = getattr(module, "__file__", None)
        if origin is not None and Path(origin).resolve().parent == root / name:
            del sys.modules[name]  # imported through the root before install()
