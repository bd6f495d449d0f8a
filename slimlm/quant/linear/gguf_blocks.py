"""GGUF block layouts -> integer codes, group scales and zero terms, exactly (numpy, no float weights).

Why: llama.cpp's quantized types are groups of small integers with a per-group scale (and a per-group
offset for the "_1" and K types). slimlm keeps them that way (``slimlm.quant.linear.gguf``) instead of
de-quantizing to float32. Every type here is written as

    w[o, i] = scale[o, g] * q[o, i] - zs[o, g]          g = i // group

with ``q`` a small integer (stored int8, or 0..15 for the 4-bit types), ``scale``/``zs`` float32
holding the exact fp32 products that ``gguf.quants.dequantize`` forms (``d * sc`` of the K types,
``dmin * m``), so that the float32 ops ``scale * q`` then ``- zs`` round exactly as the gguf package's
``d * q + m`` / ``d * q - dm`` do (``a + m == a - (-m)`` in IEEE arithmetic). Q4_0/Q5_0/Q8_0/Q3_K/Q6_K
have no offset (``zs`` is None); Q4_0 keeps its unsigned nibbles and a code offset of 8
(``w = d * (q - 8)``, the integer subtraction is exact).

| type | group | codes | scale | zs |
|---|---|---|---|---|
| Q8_0 | 32 | int8 | d | - |
| Q4_0 | 32 | 0..15 (code offset 8) | d | - |
| Q4_1 | 32 | 0..15 | d | -m |
| Q5_0 | 32 | int8 q - 16 | d | - |
| Q5_1 | 32 | int8 0..31 | d | -m |
| Q2_K | 16 | int8 0..3 | d * (sc & 15) | dmin * (sc >> 4) |
| Q3_K | 16 | int8 -4..3 | d * (sc - 32) | - |
| Q4_K | 32 | 0..15 | d * sc | dmin * m |
| Q5_K | 32 | int8 0..31 | d * sc | dmin * m |
| Q6_K | 16 | int8 q - 32 | d * sc | - |

Example::

    blocks = GGUFFile(path).tensor_bytes(info)          # uint8 [rows, bytes_per_row]
    g = decode_blocks(blocks, "Q4_K", cols)             # GGUFCodes(codes [rows, cols], scale, zs, ...)

Tests: ``.venv/bin/pytest tests/loaders/test_gguf_native.py`` (``gguf.quants.dequantize`` is the oracle).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

QK_K = 256  # K-quant super-block


@dataclass
class GGUFCodes:
    """One tensor's integers and group terms (rows = output features)."""

    codes: np.ndarray  # [rows, cols] int8, or uint8 0..15 when nibble
    scale: np.ndarray  # [rows, cols // group] float32
    zs: np.ndarray | None  # [rows, cols // group] float32 (subtracted) or None
    group: int
    nibble: bool  # 4-bit codes 0..15 (Q4_0, Q4_1, Q4_K)
    code_offset: int  # subtracted from the codes before scaling (8 for Q4_0, else 0)


# type -> (elements per block, bytes per block, group, nibble codes, code offset, has zs)
LAYOUTS: dict[str, tuple[int, int, int, bool, int, bool]] = {
    "Q8_0": (32, 34, 32, False, 0, False),
    "Q4_0": (32, 18, 32, True, 8, False),
    "Q4_1": (32, 20, 32, True, 0, True),
    "Q5_0": (32, 22, 32, False, 0, False),
    "Q5_1": (32, 24, 32, False, 0, True),
    "Q2_K": (QK_K, 84, 16, False, 0, True),
    "Q3_K": (QK_K, 110, 16, False, 0, False),
    "Q4_K": (QK_K, 144, 32, True, 0, True),
    "Q5_K": (QK_K, 176, 32, False, 0, True),
    "Q6_K": (QK_K, 210, 16, False, 0, False),
}
NATIVE_TYPES = tuple(LAYOUTS)


def _f16(b: np.ndarray) -> np.ndarray:
    """[..., 2] uint8 little-endian fp16 -> [...] float32 (exact)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _nibbles_split16(qs: np.ndarray) -> np.ndarray:
    """[..., 16] bytes -> [..., 32] codes: element j in byte j's low nibble, j + 16 in its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _bits32(qh: np.ndarray) -> np.ndarray:
    """[..., 4] bytes (a little-endian uint32) -> [..., 32] bits 0/1, bit j for element j."""
    return np.unpackbits(qh, axis=-1, bitorder="little")


def _k_scale_min(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte scale field [..., 12] -> (scales [..., 8], mins [..., 8]) 6-bit each.

    Bytes 0-3: scales 0-3 (low 6 bits) + 2 high bits of scales 4-7; bytes 4-7: mins 0-3 likewise for
    mins 4-7; bytes 8-11: low nibble = scale 4+j's low 4 bits, high nibble = min 4+j's low 4 bits.
    """
    a, b, c = sc[..., 0:4], sc[..., 4:8], sc[..., 8:12]
    scales = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=-1)
    mins = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=-1)
    return scales, mins


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K low bits [..., 64] bytes -> [..., 256] 2-bit values: element 128c + 32s + j is bits
    2s..2s+1 of byte 32c + j."""
    lead = qs.shape[:-1]
    v = qs.reshape(*lead, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
    return (v & 3).reshape(*lead, QK_K)


def decode_blocks(raw: np.ndarray, qtype: str, cols: int) -> GGUFCodes:
    """Raw blocks ``uint8 [rows, bytes_per_row]`` of type ``qtype`` (a row holds ``cols`` elements)."""
    block, size, group, nib, c0, _ = LAYOUTS[qtype]
    rows = raw.shape[0]
    nb = cols // block
    if cols % block or raw.shape[1] != nb * size:
        raise ValueError(f"{qtype}: a row of {cols} elements is not {nb} blocks of {size} bytes")
    b = raw.reshape(rows, nb, size)
    zs: np.ndarray | None = None
    if qtype == "Q8_0":
        scale, q = _f16(b[..., 0:2]), b[..., 2:].view(np.int8)
    elif qtype == "Q4_0":
        scale, q = _f16(b[..., 0:2]), _nibbles_split16(b[..., 2:])
    elif qtype == "Q4_1":
        scale, zs, q = _f16(b[..., 0:2]), -_f16(b[..., 2:4]), _nibbles_split16(b[..., 4:])
    elif qtype in ("Q5_0", "Q5_1"):
        off = 2 if qtype == "Q5_0" else 4
        scale = _f16(b[..., 0:2])
        hi = _bits32(b[..., off:off + 4])
        q5 = _nibbles_split16(b[..., off + 4:]) | (hi << 4)
        if qtype == "Q5_0":
            q = (q5.astype(np.int16) - 16).astype(np.int8)
        else:
            zs, q = -_f16(b[..., 2:4]), q5.astype(np.int8)
    elif qtype in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b[..., 0:2])[..., None], _f16(b[..., 2:4])[..., None]  # [rows, nb, 1]
        sc, mn = _k_scale_min(b[..., 4:16])
        scale = (d * sc.astype(np.float32)).reshape(rows, -1)  # [rows, nb * 8]
        zs = (dmin * mn.astype(np.float32)).reshape(rows, -1)
        ql: np.ndarray = b[..., -128:].reshape(rows, nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
        q = (ql & 0x0F).reshape(rows, nb, QK_K)  # sub-block 2k: low nibbles of bytes 32k.., 2k + 1: high
        if qtype == "Q5_K":
            hbit = (b[..., 16:48].reshape(rows, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
            q = (q | (hbit.reshape(rows, nb, QK_K) << 4)).astype(np.int8)
    elif qtype == "Q6_K":
        ql = b[..., 0:128].reshape(rows, nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(2, 1)
        ql = (ql & 0x0F).reshape(rows, nb, QK_K)  # half h: 64 low nibbles then 64 high nibbles
        qh: np.ndarray = b[..., 128:192].reshape(rows, nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)
        qh = (qh & 3).reshape(rows, nb, QK_K)
        q = ((ql | (qh << 4)).astype(np.int16) - 32).astype(np.int8)
        sc = b[..., 192:208].view(np.int8).astype(np.float32)  # [rows, nb, 16]
        scale = (_f16(b[..., 208:210])[..., None] * sc).reshape(rows, -1)
    elif qtype == "Q3_K":
        hmask, qs, sc12 = b[..., 0:32], b[..., 32:96], b[..., 96:108]
        lo = np.concatenate([sc12[..., 0:8] & 0x0F, sc12[..., 0:8] >> 4], axis=-1)  # [rows, nb, 16]
        hi = (sc12[..., 8:12].reshape(rows, nb, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(4, 1)) & 3
        sc = (lo | (hi.reshape(rows, nb, 16) << 4)).astype(np.float32) - np.float32(32)
        scale = (_f16(b[..., 108:110])[..., None] * sc).reshape(rows, -1)
        hbit = (hmask.reshape(rows, nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(8, 1)) & 1
        # the high bit set means no offset: q = low - 4 * (1 - high)
        q = (_crumbs(qs).astype(np.int8) - ((1 - hbit.reshape(rows, nb, QK_K)) * 4).astype(np.int8))
    elif qtype == "Q2_K":
        sc = b[..., 0:16]
        d, dmin = _f16(b[..., 80:82])[..., None], _f16(b[..., 82:84])[..., None]
        scale = (d * (sc & 0x0F).astype(np.float32)).reshape(rows, -1)
        zs = (dmin * (sc >> 4).astype(np.float32)).reshape(rows, -1)
        q = _crumbs(b[..., 16:80]).astype(np.int8)
    else:  # pragma: no cover - guarded by LAYOUTS
        raise ValueError(f"no native layout for {qtype}")
    codes = np.ascontiguousarray(q.reshape(rows, cols))
    if nib:
        codes = codes.astype(np.uint8, copy=False)
    scale = np.ascontiguousarray(scale.reshape(rows, cols // group), dtype=np.float32)
    if zs is not None:
        zs = np.ascontiguousarray(zs.reshape(rows, cols // group), dtype=np.float32)
    return GGUFCodes(codes, scale, zs, group, nib, c0)
