"""CPU matmul kernels for the quantized linears, chosen by capability, each with a reference fallback.

Why: PyTorch ships fast CPU kernels for weight-only int8 (``aten._weight_int8pack_mm``), weight-only
int4 (``aten._weight_int4pack_mm_for_cpu``) and int8 x int8 (``torch._int_mm``), but each has shape,
dtype and layout rules. This module hides them behind small functions:

- ``int8_weight_mm(x, w, s)``: ``x: [M, K]`` float, ``w: [N, K]`` int8, ``s: [N]`` -> ``x @ (w*s).T``.
  The kernel runs with bf16 activations (``ACT_DTYPE``): measured 7-25x faster than fp32 activations
  on AVX-512 machines and 2-10x on AVX2 (see ``benchmarks/quant_kernels.py``); inputs are converted at
  the boundary and the result is cast back to the caller's dtype.
- int4: ``int4_kernel_group`` picks a kernel group size (32/64/128/256) compatible with the
  quantization groups, ``int4_pack`` converts codes ``[N, K]`` into the CPU-specific kernel layout,
  ``int4_scales_and_zeros`` builds the ``[K/G, N, 2]`` tensor, and ``int4_mm`` runs it. The kernel
  dequantizes ``w = (q - 8) * s + z'``; our convention ``w = (q - z) * s`` maps to ``z' = (8 - z) * s``.
  ``Int4Layout`` inverts the CPU layout exactly (probing it with index-encoded codes), so a module can
  drop its portable copy and still save a portable checkpoint.
- ``quantize_per_token_int8`` + ``int_mm``: W8A8. ``torch._int_mm`` where the CPU has int8 dot
  instructions (VNNI/AMX); elsewhere (AVX2) it is ~20x slower than fp32, so the same exact integers come
  from fp32 GEMMs over chunks of <= 1,024 inputs (``int_mm_via_float``). On CPU ``_int_mm`` takes any
  shape (CUDA needs M > 16 and K, N multiples of 8); ``has_int_mm`` probes an odd shape once.

Run ``.venv/bin/python benchmarks/quant_kernels.py`` to see what each path costs on this CPU.
"""

from __future__ import annotations

import functools

import torch

# Activation dtype fed to the int8/int4 weight-only kernels: bf16 is the fast path on every x86 CPU
# measured (AVX2, AVX-512, AMX); fp32 activations run the same kernels 2-100x slower.
ACT_DTYPE = torch.bfloat16
INT4_KERNEL_GROUPS = (256, 128, 64, 32)
INT4_INNER_K_TILES = 2  # ignored by the CPU kernel layout, required by the signature


def cpu_capability() -> str:
    """``torch.backends.cpu.get_cpu_capability()``: 'AVX512', 'AVX2', 'DEFAULT', ..."""
    return str(torch.backends.cpu.get_cpu_capability())


def _has_op(name: str) -> bool:
    return hasattr(torch.ops.aten, name)


@functools.cache
def has_int8_weight_kernel() -> bool:
    return _has_op("_weight_int8pack_mm")


@functools.cache
def has_int4_weight_kernel() -> bool:
    return _has_op("_weight_int4pack_mm_for_cpu") and _has_op("_convert_weight_to_int4pack_for_cpu")


# --- weight-only int8 ---------------------------------------------------------------------------
KERNEL_ALIGN = 64  # bytes: one AVX-512 vector


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if its data starts on a 64-byte boundary, else a contiguous copy (which torch's
    allocator aligns). torch 2.13's AVX-512 ``_weight_int8pack_mm`` reads the weight with aligned
    vector loads for M >= ~12 rows and segfaults on a weight loaded from a safetensors file at an
    offset that is only 8-byte aligned (seen on Zen 5)."""
    return t if t.data_ptr() % KERNEL_ALIGN == 0 else t.contiguous().clone()


def int8_weight_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, use_kernel: bool = True) -> torch.Tensor:
    """``x: [M, K]``, ``w: [N, K]`` int8, ``scale: [N]`` float -> ``[M, N]`` in x's dtype."""
    if use_kernel and has_int8_weight_kernel():
        y = torch.ops.aten._weight_int8pack_mm(x.to(ACT_DTYPE).contiguous(), aligned(w), scale.to(ACT_DTYPE))
        return y.to(x.dtype)
    return (x.float() @ w.float().t() * scale.float()).to(x.dtype)


# --- weight-only int4 ---------------------------------------------------------------------------
def int4_kernel_group(group_size: int, in_features: int, out_features: int) -> int | None:
    """Largest kernel group (32..256) dividing both the quantization group and the row, or None.

    A quantization group of 128 over a row of 576 (4 x 128 + 64) runs as kernel groups of 64 with each
    scale repeated twice: exactly the same weights. None when the kernel cannot be used (N % 16 != 0).
    """
    if not has_int4_weight_kernel() or out_features % 16 != 0 or in_features % 2 != 0:
        return None
    for g in INT4_KERNEL_GROUPS:
        if group_size % g == 0 and in_features % g == 0:
            return g
    return None


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Codes ``[N, K]`` (0..15) -> the CPU kernel's packed uint8 layout ``[N, K/2]``."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INT4_INNER_K_TILES)


def int4_scales_and_zeros(scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-kernel-group ``scale, zero: [N, K/G]`` (our convention) -> ``[K/G, N, 2]`` (s, (8 - z) * s)."""
    s = scale.float()
    zf = (8.0 - zero.float()) * s  # w = (q - z) s = (q - 8) s + (8 - z) s
    return torch.stack([s.t(), zf.t()], dim=-1).to(dtype).contiguous()


def int4_mm(x: torch.Tensor, packed: torch.Tensor, group: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """``x: [M, K]`` -> ``[M, N]`` in x's dtype, computed with ``scales_and_zeros.dtype`` activations."""
    xa = x.to(scales_and_zeros.dtype).contiguous()
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xa, packed, group, scales_and_zeros).to(x.dtype)


@functools.lru_cache(maxsize=32)
def _int4_layout_source(rows: int, cols: int) -> torch.Tensor:
    """For each nibble of ``int4_pack`` on a ``[rows, cols]`` input, the flat source index it holds.

    Found by packing the source index itself, four bits per pass: exact for any nibble permutation.
    """
    idx = torch.arange(rows * cols, dtype=torch.int64)
    src = torch.zeros(rows * cols, dtype=torch.int64)
    n_pass = max(1, -(-int(rows * cols - 1).bit_length() // 4))
    for p in range(n_pass):
        codes = ((idx >> (4 * p)) & 0xF).reshape(rows, cols)
        packed = int4_pack(codes)
        nib = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(-1).to(torch.int64)
        src |= nib << (4 * p)
    return src


class Int4Layout:
    """Exact inverse of the CPU int4 kernel layout for ``[N, K]`` codes, computed row-chunk by row-chunk.

    The layout packs blocks of 16-64 output rows independently, so the permutation of a 64-row chunk
    is reused for every chunk. :meth:`verify` checks this on the actual tensor before a module trusts it.
    """

    CHUNK = 64

    def __init__(self, n: int, k: int) -> None:
        self.n, self.k = n, k

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``packed: [N, K/2]`` kernel layout -> codes ``[N, K]`` uint8."""
        out = torch.empty(self.n, self.k, dtype=torch.uint8)
        for r0 in range(0, self.n, self.CHUNK):
            r1 = min(self.n, r0 + self.CHUNK)
            src = _int4_layout_source(r1 - r0, self.k)
            chunk = packed[r0:r1]
            nib = torch.stack([chunk & 0xF, chunk >> 4], dim=-1).reshape(-1)
            flat = torch.empty((r1 - r0) * self.k, dtype=torch.uint8)
            flat[src] = nib
            out[r0:r1] = flat.reshape(r1 - r0, self.k)
        return out

    def verify(self, packed: torch.Tensor, q: torch.Tensor) -> bool:
        return bool(torch.equal(self.unpack(packed), q.to(torch.uint8)))


# --- W8A8 ---------------------------------------------------------------------------------------
def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row: ``x: [M, K] -> (q int8 [M, K], scale [M, 1] float32)``.

    ``scale = absmax / 127`` (range -127..127); all-zero rows get a tiny scale and codes 0.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
    q = torch.clamp(torch.round(xf / scale), -127, 127).to(torch.int8)
    return q, scale


@functools.cache
def has_int_mm() -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    try:  # shape rules differ between backends: probe an odd shape once
        a = torch.ones(3, 17, dtype=torch.int8)
        return bool(torch.equal(torch._int_mm(a, torch.ones(17, 5, dtype=torch.int8)), torch.full((3, 5), 17, dtype=torch.int32)))
    except RuntimeError:
        return False


@functools.cache
def has_int8_dot_instructions() -> bool:
    """Whether the CPU has int8 dot-product instructions (AVX-512 VNNI, AVX-VNNI or AMX-INT8), which
    torch's CPU ``_int_mm`` needs to be fast: on an AVX2-only Zen 1 it ran 22x slower than the fp32
    GEMM of the same shape (1,024 x 576 x 1,536)."""
    from slimlm.utils.cpu import has_int8_dot

    return has_int8_dot()


EXACT_FP32_K = 1024  # int8 x int8 products (|p| <= 128 * 127) summed over <= 1024 terms stay below 2**24


def int_mm_via_float(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b`` for int8 operands through fp32 GEMMs over chunks of at most
    :data:`EXACT_FP32_K` inputs: every partial sum is an integer below 2**24, so fp32 holds it exactly
    in any summation order; the chunks are added in int32. fp64 when matmuls may run in reduced
    precision (``torch.set_float32_matmul_precision`` other than "highest")."""
    dt = torch.float32 if torch.get_float32_matmul_precision() == "highest" else torch.float64
    k = a.shape[1]
    out: torch.Tensor | None = None
    for k0 in range(0, k, EXACT_FP32_K):
        part = (a[:, k0 : k0 + EXACT_FP32_K].to(dt) @ b[k0 : k0 + EXACT_FP32_K].to(dt)).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out if out is not None else torch.zeros(a.shape[0], b.shape[1], dtype=torch.int32)


def int_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a: [M, K]`` int8 @ ``b: [K, N]`` int8 -> ``[M, N]`` int32, exact: ``torch._int_mm`` on CPUs with
    int8 dot instructions, else :func:`int_mm_via_float` (same integers, the fast fp32 GEMM)."""
    if has_int_mm() and has_int8_dot_instructions():
        return torch._int_mm(a.contiguous(), b)
    return int_mm_via_float(a, b)
