"""Process memory on Linux: current and peak RSS, the tensor bytes a model really holds, and handing
freed heap pages back to the OS.

Used by ``slimlm quantize`` (the peak it reports), ``slimlm info`` (what a loaded model holds), the
loader and the calibration driver (trim after a load / each layer) and the benchmarks.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Iterable
from typing import Any

import torch


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


def current_rss_bytes() -> int:
    """Resident set size of this process now (``/proc/self/statm``); 0 where unsupported."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def tensor_storage_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and aliases counted once; meta tensors 0)."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if t.is_meta:
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if key and key not in seen:
            seen.add(key)
            total += st.nbytes()
    return total


def module_nbytes(module: torch.nn.Module) -> int:
    """Bytes of tensor storage a module holds now: parameters, all buffers (persistent or not) and
    tensors kept in module attributes (a quantized linear's decode spec, fused q|k|v weights, kernel
    argument tuples), each storage counted once (views of one tensor share it)."""
    tensors: list[torch.Tensor] = []
    for m in module.modules():
        tensors += list(m.parameters(recurse=False)) + list(m.buffers(recurse=False))
        for v in m.__dict__.values():
            tensors += _held_tensors(v)
    return tensor_storage_nbytes(tensors)


def _held_tensors(v: Any, depth: int = 0) -> list[torch.Tensor]:
    """Tensors in an attribute value: a tensor, or inside tuples/lists and plain objects' attributes."""
    if isinstance(v, torch.Tensor):
        return [v]
    if depth >= 2 or isinstance(v, (str, bytes, int, float, dict, torch.nn.Module)):
        return []
    if isinstance(v, (tuple, list)):
        return [t for x in v for t in _held_tensors(x, depth + 1)]
    d = getattr(v, "__dict__", None)
    return [t for x in d.values() for t in _held_tensors(x, depth + 1)] if isinstance(d, dict) and depth == 0 else []


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
