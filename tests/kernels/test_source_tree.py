"""A source checkout's top-level package folders do not shadow installed packages.

transformers >= 5.25 imports Hugging Face's `kernels` package; with the repository root on
`sys.path` (pytest, `python -m` in the checkout) our `kernels/` answered instead and 28 Hugging
Face tests failed. These tests run fresh interpreters with the root first on `sys.path`.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from ctxscale.kernels import _source_tree

ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, cwd: Path) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_source_root_found_from_checkout():
    assert _source_tree.source_root() == ROOT


@pytest.mark.parametrize("name", _source_tree.PACKAGE_DIRS)
def test_top_level_names_skip_the_checkout(name):
    # `-c` puts '' (the working directory, here the root) first on sys.path, like `python -m`
    code = (
        "import importlib.util, sys\n"
        f"before = importlib.util.find_spec({name!r})\n"
        "import ctxscale.kernels, ctxscale.dist, ctxscale.models, ctxscale.launch\n"
        f"after = importlib.util.find_spec({name!r})\n"
        "origin = lambda s: 'none' if s is None else str(s.origin)\n"
        "print(origin(before)); print(origin(after))\n"
        "import tests.harness\n"  # the rest of the root still imports
        "print(ctxscale.kernels.__file__)\n"
    )
    before, after, ours = _python(code, ROOT).splitlines()
    assert before.startswith(str(ROOT / name)), "the root should shadow before install()"
    assert not after.startswith(str(ROOT / name)), f"{name!r} still resolves to the checkout"
    assert ours == str(ROOT / "kernels" / "__init__.py")


def test_installed_kernels_package_wins(tmp_path):
    # a stand-in for Hugging Face's `kernels`, on the entry after the root ('')
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'hub'\n")
    code = (
        "import sys\n"
        f"sys.path.insert(1, {str(site)!r})\n"
        "import ctxscale.kernels\n"
        "from kernels import CUDAProperties\n"
        "print(CUDAProperties)\n"
    )
    assert _python(code, ROOT) == "hub"
