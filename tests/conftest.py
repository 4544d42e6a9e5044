"""Suite-wide test setup.

Triton decides at decoration time (`@triton.jit`) whether a kernel is compiled or interpreted, so
`TRITON_INTERPRET=1` is set here, before any test module is imported, for the whole session
(unless the environment already sets it: `TRITON_INTERPRET=0` on a CUDA machine runs the kernels
compiled). The distributed tests' worker processes inherit it, so a worker that imports a kernel
module in one test still interprets it in the next (`tests/dist/test_ring.py` failed that way
when `tests/dist` ran on its own).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
