"""FP8 e4m3 simulation: round-trip values through ``torch.float8_e4m3fn`` with a scale.

Why: to measure what FP8 weights/activations would cost in accuracy on hardware without FP8 math
(this CPU). How: ``scale = absmax / 448`` (448 is e4m3fn's largest finite value) per tensor, per row
(``dim=-1`` reduction, ``per_row=True``), then ``x_hat = float(fp8(x / scale)) * scale``.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448.0


def fp8_scale(x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """absmax / 448 per tensor (shape [1]) or per row (shape [..., 1]); never 0."""
    if per_row:
        absmax = x.detach().float().abs().amax(dim=-1, keepdim=True)
    else:
        absmax = x.detach().float().abs().amax().reshape(1)
    return torch.where(absmax == 0, torch.ones_like(absmax), absmax) / FP8_E4M3_MAX


def fp8_quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to e4m3fn (saturated to +-448): a float8_e4m3fn tensor."""
    return torch.clamp(x.float() / scale, -FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


def fp8_fake_quantize(x: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Round trip through e4m3 with an absmax scale; returns float32 of ``x``'s shape."""
    scale = fp8_scale(x, per_row)
    return fp8_dequantize(fp8_quantize(x, scale), scale)
