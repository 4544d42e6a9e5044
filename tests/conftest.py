"""Suite-wide test setup.

Triton decides at decoration time (`@triton.jit`) whether a kernel is compiled or interpreted, so
`TRITON_INTERPRET=1` is set here, before any test module is imported, for the whole session
(unless the environment already sets it: `TRITON_INTERPRET=0` on a CUDA machine runs the kernels
compiled). The distributed tests' worker processes inherit it, so a worker that imports a kernel
module in one test still interprets it in the next (`tests/dist/test_ring.py` failed that way
when `tests/dist` ran on its own).

pytest puts the repository root on `sys.path` (it imports `tests.*`), where `kernels/` would shadow
an installed package named `kernels` (transformers >= 5.25 imports Hugging Face's); importing
`ctxscale.kernels` installs the finder that prevents it (`kernels/_source_tree.py`) before any test
module imports transformers.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import ctxscale.kernels  # noqa: E402,F401  (after TRITON_INTERPRET: it imports the Triton kernels)
