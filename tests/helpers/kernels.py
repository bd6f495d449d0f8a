"""The rule for tests of slimlm's C++ kernels: skip where the CPU cannot run them, fail where it can.

Why: a kernel build that breaks (a compile error, a renamed source) on a machine with AVX2 must
turn the suite red; a ``skipif(kernels.load() is None)`` would hide it as a skip.

Example:
    @pytest.fixture(autouse=True)
    def _kernels_built() -> None:
        require_kernels()
"""

from __future__ import annotations

import pytest

from slimlm import kernels


def require_kernels() -> None:
    """Skip (with the reason) where ``kernels.supported()`` says no — no AVX2, not x86-64, or
    ``SLIMLM_KERNELS=0`` set by the user — and fail when a supported CPU could not build them."""
    ok, why = kernels.supported()
    if not ok:
        pytest.skip(f"slimlm's C++ kernels do not run here: {why}")
    if kernels.load() is None:
        pytest.fail(f"slimlm's C++ kernels failed to build on a CPU that supports them ({why}): {kernels.status()}")
