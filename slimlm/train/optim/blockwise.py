"""Block-wise 8-bit quantization of optimizer states (Dettmers et al. 2022, "8-bit Optimizers via
Block-wise Quantization"), the storage format of :mod:`slimlm.train.optim.adamw8bit`.

A state tensor is cut into blocks of ``BLOCK`` (256) consecutive values; each block keeps its absmax as
one fp32 scale and every value as the uint8 index of the nearest entry of a 256-entry code table after
division by that absmax. The table is the *dynamic* (tree) data type: an exponent in base 10 spanning
seven decades (1e-6 .. 1), with linear fraction bits in each decade, so that both the many small and the
few large values of a moment keep relative precision. The signed table (first moment) spends a bit on
the sign; the unsigned one (second moment, never negative) spends it on one more fraction bit.

Bytes per value: 1 + 4/256. The tables are constants (not saved in the optimizer state).
"""

from __future__ import annotations

from functools import cache

import torch

BLOCK = 256


@cache
def dynamic_code(signed: bool) -> torch.Tensor:
    """The 256 sorted fp32 values of the dynamic data type (7 exponent decades, then 0 and 1).

    Decade i (i = 0..6, scale 10^(i-6)) holds the midpoints of ``2^i`` (signed) or ``2^(i+1)``
    (unsigned) equal steps of [0.1, 1]: 127 or 254 magnitudes, mirrored when signed, plus 0 and 1.
    """
    values: list[float] = [0.0, 1.0]
    for i in range(7):
        n = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float32)
        mags = (10.0 ** (i - 6) * ((edges[:-1] + edges[1:]) / 2.0)).tolist()  # all in fp32
        values += mags + ([-m for m in mags] if signed else [])
    if len(values) != 256:  # pragma: no cover - a wrong table is a programming error
        raise AssertionError(len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


@cache
def _midpoints(signed: bool) -> torch.Tensor:
    code = dynamic_code(signed)
    return (code[1:] + code[:-1]) / 2  # (255,) decision boundaries for the nearest entry


def n_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def quantize_blockwise(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (any shape, fp32) -> (codes uint8 (x.numel(),), absmax fp32 (n_blocks,))."""
    flat = x.reshape(-1)
    n = flat.numel()
    pad = n_blocks(n) * BLOCK - n
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)  # (nb, 256)
    absmax = blocks.abs().amax(dim=1)  # (nb,)
    normed = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny).unsqueeze(1)
    codes = torch.bucketize(normed, _midpoints(signed).to(x.device)).to(torch.uint8)
    return codes.view(-1)[:n].clone(), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, signed: bool) -> torch.Tensor:
    """(codes uint8 (n,), absmax (n_blocks,)) -> fp32 (n,)."""
    n = codes.numel()
    values = dynamic_code(signed).to(codes.device)[codes.long()]  # (n,)
    scale = absmax.repeat_interleave(BLOCK)[:n]
    return values * scale
