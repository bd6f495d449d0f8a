"""The machine and software record a bench run stores once: CPU, capability, cores, threads,
measured read bandwidth and GEMM rate, exact package versions.

Why: numbers from two machines or two days are only comparable next to what they ran on; the
report labels every point with :func:`machine_label`. Measuring takes about a second.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from slimlm.bench.sysinfo import measure_bandwidth, system_info

PACKAGES = ("slimlm", "torch", "numpy", "safetensors", "tokenizers", "gguf", "tqdm", "jsonschema", "matplotlib")


def measure_gemm_gflops(dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 3) -> float:
    """GFLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (best of ``repeats`` after one warm-up)."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


def software_versions() -> dict[str, str]:
    """Installed versions of the packages a measurement depends on, Python, and slimlm's git commit."""
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    out["torch"] = torch.__version__  # the build actually imported
    commit = _git_commit(Path(__file__).resolve().parents[2])
    if commit:
        out["slimlm_commit"] = commit
    return out


def _git_commit(root: Path) -> str | None:
    if not (root / ".git").exists():
        return None
    try:
        r = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine_record(name: str | None = None, threads: int | None = None, quick: bool = False) -> dict[str, Any]:
    """What this run ran on. ``name`` labels the machine in reports (default: the host name)."""
    if threads is not None:
        torch.set_num_threads(threads)
    info = system_info()
    rec: dict[str, Any] = {
        "name": name or platform.node() or "unknown",
        "cpu_model": info["cpu_model"],
        "cpu_capability": info["cpu_capability"],
        "cpu_flags": info["cpu_flags"],
        "cores": os.cpu_count() or 0,
        "threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "loadavg_1m": info["loadavg_1m"],
        "bandwidth_GBps": measure_bandwidth(mib=64 if quick else 256, repeats=3),
        "gemm_gflops": {"fp32": measure_gemm_gflops(torch.float32, 256 if quick else 1024),
                        "bf16": measure_gemm_gflops(torch.bfloat16, 256 if quick else 1024)},
    }
    return rec


def machine_label(m: dict[str, Any]) -> str:
    """Short label for plots and tables, e.g. ``box1 (Intel Xeon ..., 2 threads)``."""
    cpu = str(m.get("cpu_model", "?")).split(" (family")[0]
    return f"{m.get('name', '?')} ({cpu}, {m.get('threads', '?')} threads)"
