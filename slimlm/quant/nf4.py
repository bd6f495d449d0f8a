"""NF4 (QLoRA's 4-bit NormalFloat) with block-wise absmax and double quantization of the absmax.

How: the weight is flattened and cut into blocks of ``block_size`` (64) values; each block is divided
by its absmax and every value is rounded to the nearest of the 16 NF4 levels (code 0..15). Double
quantization (QLoRA): the fp32 absmax values minus their mean are quantized to int8 (symmetric,
``scale2 = absmax / 127``) in blocks of ``double_block_size`` (256) absmax values, so the constants
cost ``8/64 + 32/(64*256) ~= 0.127`` bits per weight instead of ``32/64 = 0.5``.

Dequantize: ``w = NF4[code] * absmax[block]`` with
``absmax = code2 * scale2[block2] + offset`` when double-quantized.
Tests: ``.venv/bin/pytest tests/quant/test_primitives.py -k nf4``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimlm.utils.errors import ConfigError

# The 16 NF4 levels of QLoRA (quantiles of N(0, 1), normalized to [-1, 1], with an exact 0).
NF4_LEVELS = torch.tensor(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=torch.float32,
)  # fmt: skip


@dataclass
class NF4Weight:
    """An NF4-quantized tensor: codes per value, absmax per block (optionally double-quantized)."""

    codes: torch.Tensor  # [numel] uint8 in 0..15, flattened row-major
    shape: tuple[int, ...]
    block_size: int
    absmax: torch.Tensor | None  # [n_blocks] float32 (when not double-quantized)
    absmax_codes: torch.Tensor | None = None  # [n_blocks] int8 (double quantization)
    absmax_scale: torch.Tensor | None = None  # [ceil(n_blocks / double_block_size)] float32
    absmax_offset: float = 0.0
    double_block_size: int = 256

    @property
    def double_quant(self) -> bool:
        return self.absmax_codes is not None

    def block_absmax(self) -> torch.Tensor:
        """The per-block absmax actually used for dequantization: [n_blocks] float32."""
        if self.absmax_codes is None:
            assert self.absmax is not None
            return self.absmax
        assert self.absmax_scale is not None
        s2 = self.absmax_scale.repeat_interleave(self.double_block_size)[: self.absmax_codes.numel()]
        return self.absmax_codes.float() * s2 + self.absmax_offset

    def dequantize(self) -> torch.Tensor:
        vals = NF4_LEVELS[self.codes.long()].reshape(-1, self.block_size)  # [n_blocks, block]
        return (vals * self.block_absmax().unsqueeze(1)).reshape(self.shape)

    def storage_bits(self) -> int:
        """Bits of storage: 4 per code plus the constants."""
        bits = 4 * self.codes.numel()
        if self.absmax_codes is None:
            assert self.absmax is not None
            return bits + 32 * self.absmax.numel()
        assert self.absmax_scale is not None
        return bits + 8 * self.absmax_codes.numel() + 32 * self.absmax_scale.numel() + 32


def nf4_round(x: torch.Tensor) -> torch.Tensor:
    """Index of the nearest NF4 level for each value of ``x`` (already in [-1, 1]): uint8 codes."""
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2  # 15 decision boundaries
    return torch.bucketize(x.float().contiguous(), mids).to(torch.uint8)


def quantize_nf4(
    w: torch.Tensor, block_size: int = 64, double_quant: bool = True, double_block_size: int = 256
) -> NF4Weight:
    """Quantize ``w`` (any shape, numel divisible by ``block_size``) to NF4."""
    if block_size <= 0 or w.numel() % block_size != 0:
        raise ConfigError(f"NF4 block_size {block_size} does not divide the tensor size {w.numel()}")
    blocks = w.detach().float().reshape(-1, block_size)  # [n_blocks, block]
    absmax = blocks.abs().amax(dim=1)
    absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    codes = nf4_round(blocks / absmax.unsqueeze(1)).reshape(-1)
    if not double_quant:
        return NF4Weight(codes, tuple(w.shape), block_size, absmax)
    offset = float(absmax.mean())
    centered = absmax - offset
    n = centered.numel()
    pad = (-n) % double_block_size
    c2 = torch.cat([centered, centered.new_zeros(pad)]).reshape(-1, double_block_size)
    s2 = c2.abs().amax(dim=1) / 127.0
    s2 = torch.where(s2 == 0, torch.ones_like(s2), s2)
    q2 = torch.clamp(torch.round(c2 / s2.unsqueeze(1)), -127, 127).to(torch.int8).reshape(-1)[:n]
    return NF4Weight(
        codes, tuple(w.shape), block_size, None,
        absmax_codes=q2, absmax_scale=s2, absmax_offset=offset, double_block_size=double_block_size,
    )  # fmt: skip
