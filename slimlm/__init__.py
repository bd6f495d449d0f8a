"""slimlm: compress, fine-tune, train and serve LLMs cheaply on CPU, and measure it.

Process set-up done once, at import, before torch's BLAS runs its first GEMM:

* ``MKL_DISABLE_FAST_MM=1`` (unless the user set it): MKL's fast memory manager, linked into torch's
  CPU wheel, keeps every GEMM packing buffer it ever allocated (about 8 MB after one forward of a
  135M model, more with more threads) where ``malloc_trim`` cannot return it; slimlm's resident
  memory goal (weights x 1.15 + 40 MB, tests/quant/test_memory.py) counts it. Buffers then come from
  malloc, which reuses them across calls.
"""

import os as _os

_os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")
