"""What this CPU can do, read once from ``/proc/cpuinfo``: its model and the instruction-set flags
that decide slimlm's dtype and kernel choices (native bf16 matmul, int8 dot products).

The CPU changes between machines (AVX2-only Zen 1/3, Zen 5 with AVX-512 BF16, Xeon with AMX), so
code paths are chosen here at run time, each with a reference fallback; benchmarks record
:func:`cpu_model` and :func:`cpu_flags` in their JSON.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

_KEEP = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8", "avx512_fp16")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's ``key: value`` lines of /proc/cpuinfo ({} where there is none)."""
    out: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break
            k, _, v = line.partition(":")
            out[k.strip()] = v.strip()
    except OSError:
        pass
    return out


def cpu_model() -> str:
    """E.g. ``AMD EPYC (family 26 model 2)``: the name alone does not tell Zen 1 from Zen 5 on VMs."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or "unknown"
    if "cpu family" in info and "model" in info:
        name += f" (family {info['cpu family']} model {info['model']})"
    return name


def cpu_flags() -> list[str]:
    """The flags among :data:`_KEEP` this CPU reports."""
    flags = set(_cpuinfo().get("flags", "").split())
    return [f for f in _KEEP if f in flags]


def has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls natively (AVX-512 BF16 or AMX): there bf16 GEMMs run
    ~4x the fp32 rate (Zen 5: 860 vs 200 GFLOP/s on 2 threads); elsewhere they are emulated."""
    f = cpu_flags()
    return "avx512_bf16" in f or "amx_bf16" in f


def has_int8_dot() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX-INT8)."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & set(cpu_flags()))
