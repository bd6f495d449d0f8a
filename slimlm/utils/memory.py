"""Process memory on Linux: peak RSS of one phase, and handing freed heap pages back to the OS.

Used by ``slimlm quantize`` (the peak it reports), the calibration driver (trims after each layer)
and the benchmarks.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any


@functools.cache
def _libc() -> Any:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def release_free_memory() -> None:
    """Return freed heap pages to the OS (glibc ``malloc_trim``), so RSS reflects live data.

    glibc keeps freed blocks of the sizes torch allocates for weights and activations in its heap;
    without this, a model whose fp32 weights were replaced by packed ones keeps the fp32 pages.
    """
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM), else since the process started."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
