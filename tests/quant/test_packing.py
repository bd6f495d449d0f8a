"""Bit packing: hand-computed bytes, exact inverses, and the compressed-tensors packer as an oracle.

Run: ``.venv/bin/pytest tests/quant/test_packing.py``.
"""

from __future__ import annotations

import pytest
import torch

from slimlm.quant.packing import (
    pack_codes,
    pack_int2,
    pack_int3,
    pack_int4,
    pack_int32,
    pack_uint8_bits,
    packed_length,
    unpack_codes,
    unpack_int2,
    unpack_int3,
    unpack_int4,
    unpack_int32,
    unpack_uint8_bits,
)
from slimlm.utils.errors import SlimlmError


def test_int4_bytes() -> None:
    q = torch.tensor([[1, 2, 15, 0, 7]], dtype=torch.uint8)
    p = pack_int4(q)
    assert p.tolist() == [[0x21, 0x0F, 0x07]]
    assert torch.equal(unpack_int4(p, 5), q)


def test_int2_bytes() -> None:
    q = torch.tensor([[1, 2, 3, 0, 3]], dtype=torch.uint8)
    p = pack_int2(q)
    assert p.tolist() == [[1 | 2 << 2 | 3 << 4, 3]]
    assert torch.equal(unpack_int2(p, 5), q)


def test_int3_bytes() -> None:
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0, 5]], dtype=torch.uint8)
    word = sum(v << (3 * i) for i, v in enumerate([1, 2, 3, 4, 5, 6, 7, 0]))
    p = pack_int3(q)
    assert p.tolist() == [[word & 0xFF, (word >> 8) & 0xFF, word >> 16, 5, 0, 0]]
    assert torch.equal(unpack_int3(p, 9), q)


def _bitstream_reference(q: list[int], bits: int, word_bits: int) -> list[int]:
    """Straightforward loop: element i at global bit i*bits, little-endian words of word_bits."""
    total = 0
    for i, v in enumerate(q):
        total |= v << (i * bits)
    n_words = -(-len(q) * bits // word_bits)
    return [(total >> (word_bits * w)) & ((1 << word_bits) - 1) for w in range(n_words)]


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 9, 32, 45])
def test_generic_layouts_match_loop_reference(bits: int, n: int) -> None:
    gen = torch.Generator().manual_seed(bits * 100 + n)
    q = torch.randint(0, 2**bits, (3, n), generator=gen)
    for row in range(3):
        ref32 = _bitstream_reference(q[row].tolist(), bits, 32)
        got32 = [w & 0xFFFFFFFF for w in pack_int32(q, bits)[row].tolist()]
        assert got32 == ref32
        assert pack_uint8_bits(q, bits)[row].tolist() == _bitstream_reference(q[row].tolist(), bits, 8)
    assert torch.equal(unpack_int32(pack_int32(q, bits), bits, n).long(), q)
    assert torch.equal(unpack_uint8_bits(pack_uint8_bits(q, bits), bits, n).long(), q)
    # along dim 0 (GPTQ qweight / compressed-tensors zero points)
    p0 = pack_int32(q.t().contiguous(), bits, dim=0)
    assert p0.shape == (-(-n * bits // 32), 3)
    assert torch.equal(unpack_int32(p0, bits, n, dim=0).long(), q.t())
    if bits < 8:
        assert pack_codes(q, bits).shape[-1] == packed_length(n, bits)
        assert torch.equal(unpack_codes(pack_codes(q, bits), bits, n).long(), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_int32_matches_compressed_tensors(bits: int) -> None:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(0, 2**bits, (5, 77))
    signed = (q - 2 ** (bits - 1)).to(torch.int8)  # compressed-tensors adds 2**(bits-1) back
    assert torch.equal(pack_int32(q, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(q.t().contiguous(), bits, dim=0), pack_to_int32(signed.t().contiguous(), bits, packed_dim=0))


def test_bad_codes_raise() -> None:
    with pytest.raises(SlimlmError):
        pack_int4(torch.tensor([16]))
    with pytest.raises(SlimlmError):
        pack_int32(torch.tensor([[-1]]), 4)
    with pytest.raises(SlimlmError):
        pack_int32(torch.zeros(2, 2, 2, dtype=torch.int64), 4)
