"""One bf16 copy per activation under CPU autocast, shared by every matmul that reads it.

Why: ``torch.autocast("cpu", bfloat16)`` casts an fp32 input separately for each matmul, and
autograd keeps each copy for backward. In a decoder layer the normed hidden state feeds q, k and v
(gate and up), and with LoRA each of those twice (base and adapter): up to six bf16 copies of one
tensor per layer are saved, a third of a LoRA step's activation memory on SmolLM2.

How: :func:`autocast_input` makes the copy once per source tensor (weakly keyed by identity) and
hands each caller its own view of it through :class:`_SharedCast`, whose backward casts the
gradient back to fp32 as autocast's cast does. Each matmul keeps its own autograd edge, so the
gradients still meet in fp32 at the source: losses and gradients are bit-identical to plain
autocast (tests/train/test_frozen.py), with one saved copy instead of several.

    x = norm(h)                                     # fp32 under autocast
    q, k = q_proj(autocast_input(x)), k_proj(autocast_input(x))   # one bf16 tensor behind both
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

_COPIES: Any = WeakIdKeyDictionary()  # fp32 source -> (its version, its bf16 copy); gone with the source


class _SharedCast(torch.autograd.Function):
    """``x`` -> a view of its precomputed low-precision copy; backward: the gradient cast to x's dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        ctx.dtype = x.dtype
        return low.view_as(low)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, None]:
        return g.to(ctx.dtype), None


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as one matmul under CPU autocast with autograd on reads it (see module docstring); ``x``
    itself otherwise (inference and calibration forwards run under no_grad: they keep nothing)."""
    if x.dtype != torch.float32 or not torch.is_grad_enabled() or not torch.is_autocast_enabled("cpu"):
        return x  # without autograd nothing keeps the copies: each matmul (and a calibration hook) sees x
    dt = torch.get_autocast_dtype("cpu")
    version, low = _COPIES.get(x, (-1, None))
    if low is None or low.dtype != dt or version != x._version:  # new, or x was written in place since
        with torch.no_grad():
            low = x.detach().to(dt)
        _COPIES[x] = (x._version, low)
    return _SharedCast.apply(x, low) if x.requires_grad else low


def matmul_input(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What projection ``mod`` reads of an input it may share with others: a plain ``nn.Linear`` the
    one autocast copy of ``x``; a wrapper (LoRA, which shares the copy inside) or a quantized linear
    (which casts as it must) ``x`` itself."""
    return autocast_input(x) if type(mod) is nn.Linear else x
