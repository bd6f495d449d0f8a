"""Bit packing of unsigned integer codes: pure functions, exact inverses, no hidden state.

Why: a 4-bit code stored in a uint8 wastes half the byte; the runtime modules and the export formats
store codes densely. Layouts (all little-endian within a byte / word, along the last dim unless said):

- ``pack_int4``: two codes per byte, element ``2j`` in the low nibble, ``2j+1`` in the high nibble.
- ``pack_int2``: four codes per byte, element ``4j+t`` at bits ``2t``.
- ``pack_int3``: eight codes in three bytes (a 24-bit little-endian word, element ``8j+t`` at bits ``3t``).
- ``pack_uint8_bits``: any width 1..8 as a dense bit stream in bytes (element ``i`` at bit ``i*b``).
- ``pack_int32``: any width 1..8 as a dense bit stream in int32 words along ``dim`` (element ``i`` at
  global bit ``i*b``; values may straddle two words). For ``b`` in {2, 4, 8} this is "value ``j`` at bits
  ``j*b`` of each word"; for 3 bits it is the GPTQ/AutoGPTQ and compressed-tensors layout (32 values in
  3 words). Used by the GPTQ and compressed-tensors exporters.

A length that is not a multiple of the pack unit is zero-padded; every ``unpack_*`` takes the original
length ``n`` and drops the padding. Tests: ``.venv/bin/pytest tests/quant/test_packing.py``.
"""

from __future__ import annotations

import torch

from slimlm.utils.errors import SlimlmError


def _check_codes(q: torch.Tensor, bits: int) -> None:
    if not 1 <= bits <= 8:
        raise SlimlmError(f"packing supports 1..8 bits, got {bits}")
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise SlimlmError(f"codes must be an integer tensor, got {q.dtype}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= (1 << bits)):
        raise SlimlmError(f"codes out of range for {bits} bits: [{int(q.min())}, {int(q.max())}]")


def _pad_last(q: torch.Tensor, multiple: int) -> torch.Tensor:
    pad = (-q.shape[-1]) % multiple
    if pad:
        q = torch.cat([q, q.new_zeros(*q.shape[:-1], pad)], dim=-1)
    return q


# --- byte layouts ---------------------------------------------------------------------------------
def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``q: [..., n]`` codes 0..15 -> ``[..., ceil(n/2)]`` uint8 (even index in the low nibble)."""
    _check_codes(q, 4)
    v = _pad_last(q.to(torch.uint8), 2).reshape(*q.shape[:-1], -1, 2)  # [..., n/2, 2]
    return v[..., 0] | (v[..., 1] << 4)


def unpack_int4(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``[..., ceil(n/2)]`` uint8 -> ``[..., n]`` uint8."""
    v = torch.stack([p & 0x0F, p >> 4], dim=-1).reshape(*p.shape[:-1], -1)
    return v[..., :n]


def pack_int2(q: torch.Tensor) -> torch.Tensor:
    """``q: [..., n]`` codes 0..3 -> ``[..., ceil(n/4)]`` uint8 (element ``4j+t`` at bits ``2t``)."""
    _check_codes(q, 2)
    v = _pad_last(q.to(torch.uint8), 4).reshape(*q.shape[:-1], -1, 4)
    return v[..., 0] | (v[..., 1] << 2) | (v[..., 2] << 4) | (v[..., 3] << 6)


def unpack_int2(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int2`."""
    v = torch.stack([(p >> (2 * t)) & 0x3 for t in range(4)], dim=-1).reshape(*p.shape[:-1], -1)
    return v[..., :n]


def pack_int3(q: torch.Tensor) -> torch.Tensor:
    """``q: [..., n]`` codes 0..7 -> ``[..., 3*ceil(n/8)]`` uint8: 8 codes per 3 bytes (24-bit LE word)."""
    _check_codes(q, 3)
    v = _pad_last(q.to(torch.int32), 8).reshape(*q.shape[:-1], -1, 8)  # [..., n/8, 8]
    shifts = torch.arange(8, dtype=torch.int32) * 3
    word = (v << shifts).sum(dim=-1)  # [..., n/8] 24-bit values (disjoint bits: sum == or)
    b = torch.stack([word & 0xFF, (word >> 8) & 0xFF, (word >> 16) & 0xFF], dim=-1)
    return b.to(torch.uint8).reshape(*q.shape[:-1], -1)


def unpack_int3(p: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_int3`."""
    b = p.to(torch.int32).reshape(*p.shape[:-1], -1, 3)
    word = b[..., 0] | (b[..., 1] << 8) | (b[..., 2] << 16)  # [..., n/8]
    shifts = torch.arange(8, dtype=torch.int32) * 3
    v = ((word.unsqueeze(-1) >> shifts) & 0x7).to(torch.uint8).reshape(*p.shape[:-1], -1)
    return v[..., :n]


def pack_uint8_bits(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Dense bit stream in bytes: ``[..., n]`` -> ``[..., ceil(n*bits/8)]`` uint8 (element i at bit i*bits).

    Works for any width; 8 codes take exactly ``bits`` bytes. Used for 5/6/7-bit storage.
    """
    _check_codes(q, bits)
    n = q.shape[-1]
    v = _pad_last(q.to(torch.int64), 8).reshape(*q.shape[:-1], -1, 8)  # [..., n/8, 8]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    word = (v << shifts).sum(dim=-1)  # [..., n/8] fits in 64 bits (8*8 = 64 at most: use bytes below)
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    out = ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)  # [..., n/8, bits]
    return out.reshape(*q.shape[:-1], -1)[..., : -(-n * bits // 8)]


def unpack_uint8_bits(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_uint8_bits`."""
    p = _pad_last(p, bits)
    b = p.to(torch.int64).reshape(*p.shape[:-1], -1, bits)  # [..., n/8, bits]
    byte_shifts = torch.arange(bits, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(dim=-1)  # [..., n/8]
    shifts = torch.arange(8, dtype=torch.int64) * bits
    v = ((word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).to(torch.uint8).reshape(*p.shape[:-1], -1)
    return v[..., :n]


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """The byte layout used by the runtime modules for ``bits``: int4/int2/int3 layouts or a dense stream."""
    if bits == 8:
        _check_codes(q, 8)
        return q.to(torch.uint8)
    if bits == 4:
        return pack_int4(q)
    if bits == 2:
        return pack_int2(q)
    if bits == 3:
        return pack_int3(q)
    return pack_uint8_bits(q, bits)


def unpack_codes(p: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes ``[..., n]``."""
    if bits == 8:
        return p[..., :n].to(torch.uint8)
    if bits == 4:
        return unpack_int4(p, n)
    if bits == 2:
        return unpack_int2(p, n)
    if bits == 3:
        return unpack_int3(p, n)
    return unpack_uint8_bits(p, bits, n)


def packed_length(n: int, bits: int) -> int:
    """Bytes :func:`pack_codes` produces for ``n`` codes of ``bits``."""
    if bits == 3:
        return 3 * -(-n // 8)
    return -(-n * bits // 8)


# --- int32 words (GPTQ, compressed-tensors) -------------------------------------------------------
def pack_int32(q: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Dense bit stream of a 2-D code tensor into int32 words along ``dim``.

    ``q: [rows, n]`` (dim=-1/1) -> ``[rows, ceil(n*bits/32)]``; dim=0 packs the columns instead:
    ``[n, cols] -> [ceil(n*bits/32), cols]``. Element ``i`` sits at global bit ``i*bits``; words are
    two's-complement int32 (bit 31 is the sign bit).
    """
    if q.dim() != 2:
        raise SlimlmError(f"pack_int32 takes a 2-D tensor, got shape {tuple(q.shape)}")
    _check_codes(q, bits)
    if dim in (0, -2):
        return pack_int32(q.t(), bits, -1).t().contiguous()
    rows, n = q.shape
    n_words = -(-n * bits // 32)
    v = _pad_last(q.to(torch.int64), 32).reshape(rows, -1, 32)  # [rows, n/32, 32]; 32 codes -> `bits` words
    pos = torch.arange(32, dtype=torch.int64) * bits
    word_i, off = pos // 32, pos % 32
    # low part of every code into its word (codes occupy disjoint bits, so the sum is an or) ...
    acc = torch.zeros(rows, v.shape[1], bits, dtype=torch.int64)
    acc.scatter_add_(2, word_i.expand(rows, v.shape[1], 32), v << off)
    # ... then the spill-over of codes straddling two words into the next one
    spill = (v << off) >> 32  # [rows, n/32, 32] the part beyond the word
    nxt = torch.zeros(rows, v.shape[1], bits + 1, dtype=torch.int64)
    nxt.scatter_add_(2, (word_i + 1).expand(rows, v.shape[1], 32), spill)
    words = (acc & 0xFFFFFFFF) | nxt[..., :bits]  # [rows, n/32, bits]
    words = words.reshape(rows, -1)[:, :n_words]
    words = torch.where(words >= 2**31, words - 2**32, words)  # to signed int32
    return words.to(torch.int32)


def unpack_int32(p: torch.Tensor, bits: int, n: int, dim: int = -1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 words -> uint8 codes with ``n`` entries along ``dim``."""
    if p.dim() != 2:
        raise SlimlmError(f"unpack_int32 takes a 2-D tensor, got shape {tuple(p.shape)}")
    if dim in (0, -2):
        return unpack_int32(p.t(), bits, n, -1).t().contiguous()
    rows = p.shape[0]
    w = p.to(torch.int64) & 0xFFFFFFFF  # unsigned view
    w = _pad_last(w, bits).reshape(rows, -1, bits)  # [rows, n/32, bits]
    w = torch.cat([w, w.new_zeros(rows, w.shape[1], 1)], dim=-1)  # a zero word for the last spill
    pos = torch.arange(32, dtype=torch.int64) * bits
    word_i, off = pos // 32, pos % 32
    lo = w[..., word_i] >> off  # [rows, n/32, 32]
    hi = w[..., word_i + 1] << (32 - off)  # bits that spilled into the next word (off > 0 only)
    v = torch.where(off > 0, lo | hi, lo) & ((1 << bits) - 1)
    return v.reshape(rows, -1)[:, :n].to(torch.uint8)
