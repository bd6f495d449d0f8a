"""slimlm's own CPU decode kernels (``decode.cpp``), built on first use, with a torch fallback.

Batch-1 decode is bound by weight streaming and per-op overhead (see BENCHMARKS.md): the kernels
here are a multi-threaded AVX2 GEMV for fp32/bf16 weights (~18 GB/s where torch's reaches ~12), a
quantized GEMV for int8 / packed int4 codes (``qgemv.cpp``: activations quantized to int8 per chunk
of up to 128 on the fly, integer dot products, as llama.cpp does; AVX-512 VNNI where the CPU has it),
an NF4 GEMV (``nf4.cpp``; AVX-512 BF16 dots where available), and fused RMSNorm, SiLU*mul, rotary
embedding and decode attention. They serve only small, inference-only calls (at most
:data:`SMALL_ROWS` rows, no autograd); everything else runs torch ops. One more routine is not for
decode: GPTQ's column sweep (``gptq.cpp``, rows in parallel, the torch loop's arithmetic bit for bit).

The extension is compiled once with ``torch.utils.cpp_extension`` (gcc + ninja, about a minute)
into torch's extension cache, in a child process (``build.py``: the calling process only imports
the built library, and a lock left by a killed build is detected and removed). It is used only when
the CPU reports AVX2 (or better) and the build succeeds; otherwise slimlm warns once and stays on
torch. Set ``SLIMLM_KERNELS=0`` to disable.
Build ahead of time (``make install`` does)::

    python -m slimlm.kernels          # builds them and prints the status
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

SMALL_ROWS = 8  # calls with at most this many rows (tokens x batch) take the decode kernels
# Quantized linears run up to this many rows as qgemv calls of SMALL_ROWS rows each (the batched
# decode of a serving step) instead of de-quantizing the weight per call into a GEMM. SmolLM2 Q4_1
# 576->1536, AMD EPYC AVX2, 2 threads: 16 rows 0.29 vs 0.78 ms, 64 rows 1.10 vs 1.32, 128 rows
# 2.28 vs 1.96 (the GEMM wins from about 100 rows).
BATCH_ROWS = 96
_batch_rows = threading.local()


@contextlib.contextmanager
def batched_rows() -> Iterator[None]:
    """Within this, GGUF linears take the decode kernel for calls of up to :data:`BATCH_ROWS` rows
    (the serving runner's steps). Outside, only up to :data:`SMALL_ROWS`: a prompt's prefill stays
    the exact fp32 GEMM that `slimlm eval` / `generate` and the parity tests measure."""
    old = getattr(_batch_rows, "on", False)
    _batch_rows.on = True
    try:
        yield
    finally:
        _batch_rows.on = old


def kernel_rows() -> int:
    """How many rows a GGUF linear's call may have to take the decode kernel here (see batched_rows)."""
    return BATCH_ROWS if getattr(_batch_rows, "on", False) else SMALL_ROWS


_SRC = [Path(__file__).with_name(n) for n in ("decode.cpp", "qgemv.cpp", "qgemv16.cpp", "qgemv23.cpp", "gptq.cpp", "nf4.cpp", "gguf.cpp")]
_HEADERS = [Path(__file__).with_name(n) for n in ("common.h", "qgemv.h")]
_EMPTY = torch.empty(0)
_ext: Any = None
_tried = False
_why = ""


def supported() -> tuple[bool, str]:
    """Whether this machine can run the kernels (before building them)."""
    if os.environ.get("SLIMLM_KERNELS", "1") == "0":
        return False, "disabled by SLIMLM_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False, f"needs x86-64 (this is {platform.machine()})"
    cap = torch.backends.cpu.get_cpu_capability()
    if cap not in ("AVX2", "AVX512"):
        return False, f"needs AVX2 (torch reports {cap})"
    return True, f"cpu capability {cap}"


def _build_name() -> str:
    """The extension's name carries a hash of its sources, their folder and the environment (sys.prefix), so two
    checkouts, versions or virtual environments of slimlm keep separate builds in torch's extension
    cache (the build file names absolute paths: sharing one name, they rebuilt each other's build,
    ~45 s, on first use)."""
    import hashlib

    h = hashlib.sha1(f"{Path(__file__).resolve().parent}|{Path(sys.prefix).resolve()}|{torch.__version__}".encode())
    for p in [*_SRC, *_HEADERS]:
        h.update(p.read_bytes())
    return f"slimlm_decode_kernels_{h.hexdigest()[:10]}"


def load(verbose: bool = False) -> Any:
    """The compiled extension, building it on first call; ``None`` when unavailable."""
    global _ext, _tried, _why
    if _tried:
        return _ext
    _tried = True
    ok, _why = supported()
    if not ok:
        return None
    try:
        from slimlm.kernels import build

        name = _build_name()
        _ext = build.import_built(name)  # the usual case: built before, imported without the build machinery
        if _ext is None:
            print("slimlm: building CPU decode kernels (once, about a minute)...", file=sys.stderr)
            build.build_in_child(name, [str(p) for p in _SRC], verbose)
            _ext = build.import_built(name)
            if _ext is None:
                raise RuntimeError(f"the build left no library at {build.library_path(name)}")
        _why = "built"
    except Exception as e:  # no compiler, no ninja, ...: stay on torch ops
        _ext, _why = None, f"build failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        warnings.warn(f"slimlm: decode kernels unavailable ({_why}); using torch ops", stacklevel=2)
    return _ext


def status() -> str:
    load()
    return ("available" if _ext is not None else "unavailable") + f" ({_why})"


def _usable(x: torch.Tensor, row: int | None = None) -> Any:
    """The extension if ``x`` (rows of ``row`` elements, default its last dim) is a small,
    inference-only call it can serve, else ``None``."""
    if x.dim() < 2 or x.numel() > SMALL_ROWS * (row or x.shape[-1]) or torch.is_grad_enabled():
        return None
    if x.dtype is not torch.float32 and x.dtype is not torch.bfloat16:
        return None
    return _ext if _tried else load()


def _gemv_weight(w: torch.Tensor) -> bool:
    """Whether the GEMV kernel reads ``w`` as is (contiguous fp32/bf16)."""
    return w.is_contiguous() and (w.dtype is torch.float32 or w.dtype is torch.bfloat16)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None,
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + F.linear(x, w, b)`` (residual optional), with the GEMV kernel for a few rows of x.

    x: [..., I], w: [O, I] -> [..., O]; the residual is added after rounding to x's dtype, as torch would.
    """
    ext = _usable(x)
    if ext is None or not _gemv_weight(w) \
            or (residual is not None and (not residual.is_contiguous() or residual.dtype != x.dtype)):
        y = torch.nn.functional.linear(x, w, b)
        return y if residual is None else residual + y
    return ext.gemv(x, w, _EMPTY if b is None else b, _EMPTY if residual is None else residual)  # type: ignore[no-any-return]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, offset: float = 0.0) -> torch.Tensor | None:
    """Fused RMSNorm (see decode.cpp for the rounding order), or ``None`` if the caller must fall back."""
    ext = _usable(x)
    if ext is None or not x.is_contiguous():
        return None
    y = ext.rms_norm(x.view(-1, x.shape[-1]), w, eps, offset, x.dtype is torch.bfloat16 and not offset)
    return y.view(x.shape)  # type: ignore[no-any-return]


def silu_mul(gu: torch.Tensor) -> torch.Tensor | None:
    """silu(gate) * up of a fused ``[..., 2F]`` gate|up tensor, or ``None`` to fall back."""
    ext = _usable(gu)
    if ext is None or not gu.is_contiguous():
        return None
    y = ext.silu_mul(gu.view(-1, gu.shape[-1]))
    return y.view(*gu.shape[:-1], gu.shape[-1] // 2)  # type: ignore[no-any-return]


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """Rotary embedding of ``x: [B, T, H, D]`` with ``cos/sin: [B, T, 1, D]``, or ``None`` to fall back."""
    ext = _usable(x, x.shape[-1] * x.shape[-2])  # rows are tokens, not heads
    if ext is None or cos.shape[-1] != x.shape[-1] or cos.dtype != x.dtype:
        return None
    b, t = x.shape[0], x.shape[1]
    return ext.rope(x, cos.reshape(b, t, -1).contiguous(), sin.reshape(b, t, -1).contiguous())  # type: ignore[no-any-return]


def _step_inputs(x: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, k_cache: torch.Tensor, pos: int,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(cos, sin, mask) as the one-token attention kernels take them, for ``x: [B, 1, ...]``
    (empty tensors for no rotary / no mask), or ``None`` if the step must fall back."""
    if x.shape[1] != 1 or not x.is_contiguous() or k_cache.dtype != x.dtype:
        return None
    if cos is None or sin is None:
        cos = sin = _EMPTY
    elif cos.dtype != x.dtype or cos.shape[-1] != k_cache.shape[-1] or not cos.is_contiguous():
        return None
    if mask is None:
        mask = _EMPTY
    elif not mask.is_contiguous() or mask.numel() != x.shape[0] * (pos + 1):
        mask = mask.expand(x.shape[0], 1, 1, pos + 1).contiguous()
    return cos, sin, mask


def attn_decode(qkv: torch.Tensor, cos: torch.Tensor | None, sin: torch.Tensor | None, k_cache: torch.Tensor,
                v_cache: torch.Tensor, layer: int, pos: int, mask: torch.Tensor | None, heads: int, kv_heads: int,
                scale: float) -> torch.Tensor | None:
    """One decode step of attention (rotary, cache write at slot ``pos``, GQA softmax) in one call.

    qkv: [B, 1, (H + 2 Hkv) D]; cos/sin: [B, 1, 1, D] or None; k/v_cache: [L, B, Hkv, Tmax, D] (slice
    ``layer``); mask: bool [B, 1, 1, pos + 1] or None. Returns [B, 1, H D], or ``None`` to fall back.
    """
    ext = _usable(qkv)
    extras = _step_inputs(qkv, cos, sin, k_cache, pos, mask) if ext is not None else None
    if extras is None:
        return None
    return ext.attn_decode(qkv, extras[0], extras[1], k_cache, v_cache, layer, pos, extras[2], heads,  # type: ignore[no-any-return]
                           kv_heads, scale)


# How the decode kernels run one linear: (weight, bias, scale, zs, group) as ``decode_layer`` takes
# them. Dense fp32/bf16 weights leave scale/zs/group empty; quantized codes (int8 ``[O, I]`` or packed
# 4-bit ``[O, I/2]``) carry float32 group scales ``[O, ng]``, zero*scale ``[O, ng]`` (or empty when
# symmetric) and a 1-element int64 group size (see qgemv.cpp).
LinearSpec = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
QBLOCK = 32  # qgemv reads codes in blocks of 32: rows and groups must be multiples of it


def dense_spec(w: torch.Tensor, b: torch.Tensor | None) -> LinearSpec | None:
    """The spec of a dense fp32/bf16 weight ``[O, I]`` and optional bias, or ``None`` if unsupported."""
    return (w, _EMPTY if b is None else b, _EMPTY, _EMPTY, _EMPTY) if _gemv_weight(w) else None


def quant_spec(codes: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, zero: torch.Tensor | None,
               group: int, in_features: int, bits: int | None = None) -> LinearSpec | None:
    """The spec of quantized codes for ``qgemv``, or ``None`` if its layout rules are not met.

    codes: int8 ``[O, I]`` (signed, ``w = (q - zero) * scale``) or uint8 ``[O, I/2]`` (two 4-bit codes
    per byte, even element in the low nibble); scale ``[O, ng]``; zero ``[O, ng]`` in the codes' own
    convention (signed for int8, 0..15 for 4-bit) or ``None`` for symmetric int8; group: input columns
    per scale (-1 = the whole row). 4-bit codes with ``O % 16 == 0`` are re-laid in 16-row tiles
    (:func:`tile_int4`, a new tensor of the same size: the spec no longer reads ``codes``). ``bits`` 2 or
    3: ``codes`` are unpacked uint8 ``[O, I]`` in ``[0, 2**bits)`` with ``O % 16 == 0``, laid out in
    :func:`tile_lowbit`'s bit planes (``bits`` / 8 bytes per weight).
    """
    group = in_features if group in (-1, 0) or group >= in_features else group
    if bits in (2, 3):
        if codes.dtype is not torch.uint8 or codes.dim() != 2 or codes.shape[1] != in_features \
                or codes.shape[0] % TILE_ROWS:
            return None
        spec = quant_spec(codes.view(torch.int8), bias, scale, zero, group, in_features)  # the layout rules
        if spec is None:
            return None
        return tile_lowbit(codes, bits), spec[1], tile_rows(spec[2]), spec[3] if zero is None else tile_rows(spec[3]), spec[4]
    nib = codes.dtype is torch.uint8
    if in_features % QBLOCK or group % QBLOCK or not codes.is_contiguous() or codes.dim() != 2 \
            or codes.dtype not in (torch.int8, torch.uint8) or codes.shape[1] != (in_features // 2 if nib else in_features):
        return None
    ng = -(-in_features // group)
    if tuple(scale.shape) != (codes.shape[0], ng):
        return None
    s = scale.float().contiguous()
    zs = _EMPTY if zero is None else (zero.float() * s).contiguous()
    b = _EMPTY if bias is None else bias.float().contiguous()
    if nib and codes.shape[0] % TILE_ROWS == 0:
        return (tile_int4(codes), b, tile_rows(s), _EMPTY if zero is None else tile_rows(zs), torch.tensor([group]))
    return codes, b, s, zs, torch.tensor([group])


TILE_ROWS = 16  # rows per tile of the tiled 4-bit layout (qgemv16.cpp)


def tile_int4(packed: torch.Tensor) -> torch.Tensor:
    """Packed 4-bit codes ``[O, I/2]`` (even element in the low nibble) -> qgemv16's tiles
    ``[O/16, I/8, 64]``: tile (R, k) holds rows 16R.. x inputs 8k..8k+7, row r in bytes 4r..4r+3 with
    byte j = code(8k + j) | code(8k + 4 + j) << 4."""
    o, half = packed.shape
    q = torch.stack([packed & 0x0F, packed >> 4], -1).reshape(o // TILE_ROWS, TILE_ROWS, half // 4, 2, 4)  # [R, r, k, hi, j]
    t = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # [R, r, k, j]
    return t.permute(0, 2, 1, 3).contiguous().view(o // TILE_ROWS, half // 4, 4 * TILE_ROWS)


def untile_int4(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tile_int4` and of the nibble packing: tiles ``[O/16, I/8, 64]`` -> codes ``[O, I]`` uint8."""
    nr, kn, _ = tiles.shape
    b = tiles.view(nr, kn, TILE_ROWS, 4).permute(0, 2, 1, 3)  # [R, r, k, j]: byte j = code(8k + j) | code(8k + 4 + j) << 4
    return torch.cat([b & 0x0F, b >> 4], -1).reshape(nr * TILE_ROWS, kn * 8)


def tile_lowbit(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpacked 2/3-bit codes uint8 ``[O, I]`` (O % 16 == 0, I % 32 == 0) -> qgemv23's bit-plane tiles
    ``[O/16, I/32, 64 * bits]`` (see qgemv23.cpp): per block of 16 rows x 32 inputs, two planes of the low
    2 bits (row r in bytes 4r..4r+3, byte j bits 2s..2s+1 = input 16p + 4s + j) and, for 3 bits, 8 masks of
    the high bit (uint64 m, bit 4r + j = input 4m + j)."""
    o, i = codes.shape
    q = codes.view(o // TILE_ROWS, TILE_ROWS, i // 32, 2, 4, 4).permute(0, 2, 3, 1, 5, 4)  # [R, kb, p, r, j, s]
    lo = (q & 3) << (2 * torch.arange(4, dtype=torch.uint8))
    planes = [lo.sum(-1, dtype=torch.uint8).reshape(o // TILE_ROWS, i // 32, 128)]  # disjoint bits: sum == or
    if bits == 3:
        h = (codes.view(o // TILE_ROWS, TILE_ROWS, i // 32, 8, 4) >> 2) & 1  # [R, r, kb, m, j]
        h = h.permute(0, 2, 3, 1, 4).reshape(o // TILE_ROWS, i // 32, 8, 8, 8)  # [R, kb, m, byte, bit]: bit 4r + j
        planes.append((h << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8).reshape(o // TILE_ROWS, i // 32, 64))
    return torch.cat(planes, -1).contiguous()


def untile_lowbit(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`tile_lowbit`: tiles ``[O/16, I/32, 64 * bits]`` -> codes ``[O, I]`` uint8."""
    nr, nb, tb = tiles.shape
    lo = tiles[:, :, :128].reshape(nr, nb, 2, TILE_ROWS, 4, 1)  # [R, kb, p, r, j, s]
    q = (lo >> (2 * torch.arange(4, dtype=torch.uint8))) & 3
    q = q.permute(0, 3, 1, 2, 5, 4).reshape(nr * TILE_ROWS, nb * 32)  # [R, r, kb, p, s, j]
    if tb == 192:
        h = (tiles[:, :, 128:].reshape(nr, nb, 8, 8, 1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [R, kb, m, byte, bit]
        h = h.reshape(nr, nb, 8, TILE_ROWS, 4).permute(0, 3, 1, 2, 4).reshape(nr * TILE_ROWS, nb * 32)
        q = q | (h << 2)
    return q


def dequant_tiles(tiles: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float, group: int,
                  dtype: torch.dtype) -> torch.Tensor | None:
    """The dense weight ``[O, I]`` in ``dtype`` (fp32 or bf16) of 4-bit (or 2/3-bit bit-plane) tiles: ``(q - zero) * scale`` in
    float32 per group, then rounded to ``dtype``; ``zero`` float32 ``[O, ng]`` or one number; ``scale``
    float32 ``[O, ng]``. None where the kernels are unavailable (the caller un-tiles in torch)."""
    ext = _ext if _tried else load()
    if ext is None or dtype not in (torch.float32, torch.bfloat16):
        return None
    z, zc = (_EMPTY, float(zero)) if isinstance(zero, (int, float)) else (zero.float().contiguous(), 0.0)
    in_features = tiles.shape[1] * (8 if tiles.shape[2] == 4 * TILE_ROWS else 32)
    group = in_features if group in (-1, 0) or group >= in_features else group
    return ext.dequant_tiles(tiles, scale.float().contiguous(), z, zc, group,  # type: ignore[no-any-return]
                             dtype is torch.bfloat16)


def tile_rows(v: torch.Tensor) -> torch.Tensor:
    """Per-row group values ``[O, ng]`` -> ``[O/16, ng, 16]`` (a group's 16 row values contiguous)."""
    o, ng = v.shape
    return v.view(o // TILE_ROWS, TILE_ROWS, ng).transpose(1, 2).contiguous()


def linear_spec(mod: torch.nn.Module) -> LinearSpec | None:
    """How the decode kernels run ``mod``: a plain ``nn.Linear`` (fp32/bf16) or a module offering
    ``decode_spec()`` (the int8 / int4 quantized linears); ``None`` if they cannot."""
    if type(mod) is torch.nn.Linear:
        return dense_spec(mod.weight, mod.bias)
    fn = getattr(mod, "decode_spec", None)
    return fn() if fn is not None else None  # type: ignore[no-any-return]


def qlinear(x: torch.Tensor, spec: LinearSpec, residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """``residual + x @ W.T + b`` with a quantized spec for a few rows of x, or ``None`` to fall back."""
    ext = _usable(x)
    if ext is None or (residual is not None and (not residual.is_contiguous() or residual.dtype != x.dtype)):
        return None
    w, b, s, zs, g = spec
    return ext.qgemv(x, w, b, _EMPTY if residual is None else residual, s, zs, int(g))  # type: ignore[no-any-return]


def qlinear_rows(x: torch.Tensor, spec: LinearSpec) -> torch.Tensor | None:
    """:func:`qlinear` for up to :data:`BATCH_ROWS` rows, in chunks of :data:`SMALL_ROWS` rows (the
    activation rounding is per row, so chunking gives what one call per row would)."""
    x2 = x.reshape(-1, x.shape[-1])  # [M, in]
    if x2.shape[0] <= SMALL_ROWS:
        return qlinear(x, spec)
    outs = []
    for i in range(0, x2.shape[0], SMALL_ROWS):
        y = qlinear(x2[i:i + SMALL_ROWS], spec)
        if y is None:
            return None
        outs.append(y)
    return torch.cat(outs).reshape(*x.shape[:-1], -1)


LayerLinears = tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]


def layer_linears(qkv: list[LinearSpec], o: LinearSpec, gu: list[LinearSpec], down: LinearSpec) -> LayerLinears:
    """A layer's linears as ``decode_layer`` takes them: q|k|v (one fused spec or three), o, gate|up
    (one or two) and down, each flattened to a list of tensors (built once per plan, not per step)."""
    return [t for sp in qkv for t in sp], list(o), [t for sp in gu for t in sp], list(down)


def decode_layer(h: torch.Tensor, norms: tuple[torch.Tensor, torch.Tensor], eps: float, linears: LayerLinears,
                 cos: torch.Tensor | None, sin: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 layer: int, pos: int, mask: torch.Tensor | None, heads: int, kv_heads: int,
                 scale: float) -> torch.Tensor | None:
    """A whole Llama-style layer's decode step in one call (see ``decode_layer`` in decode.cpp).

    ``linears``: from :func:`layer_linears` (specs from :func:`linear_spec`). Returns the new
    h [B, 1, D], or ``None`` to fall back.
    """
    ext = _usable(h)
    extras = _step_inputs(h, cos, sin, k_cache, pos, mask) if ext is not None else None
    if extras is None:
        return None
    return ext.decode_layer(h, norms[0], norms[1], eps, *linears, extras[0], extras[1], k_cache, v_cache,  # type: ignore[no-any-return]
                            layer, pos, extras[2], heads, kv_heads, scale)
