"""Facts every benchmark JSON records: CPU model and capability, threads, versions, bandwidth."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from slimlm.utils.cpu import cpu_flags, cpu_model, has_native_bf16

__all__ = ["cpu_flags", "cpu_model", "has_native_bf16", "system_info"]


def system_info() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": cpu_flags(),
        "threads": torch.get_num_threads(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "loadavg_1m": os.getloadavg()[0],
    }


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: sum over a buffer much larger than the caches (best of repeats)."""
    buf = torch.empty(mib * 2**20 // 4, dtype=torch.float32).uniform_()
    buf.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best / 1e9


def save_json(obj: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.rename(p)
    return p
