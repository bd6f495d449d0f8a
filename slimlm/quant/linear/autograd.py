"""Backward through a frozen compressed linear: gradient w.r.t. its input from the de-quantized weight.

Why: the quantized linears compute with packed codes (torch's int8/int4 pack kernels, int8 x int8
``_int_mm``, NF4 lookups), none of which has a derivative, and W8A8 rounds its activations (zero
gradient almost everywhere). A frozen base (QLoRA, LoRA on a quantized model, training only what
follows a compressed layer) needs only ``dL/dx = dL/dy @ W``, with ``W`` the weight the module
stands for (``dense_weight()``, the exact de-quantization): the straight-through estimator for the
activation rounding of W8A8 / LLM.int8(). The codes, scales and biases stay buffers and get no grad.

How: :func:`frozen_linear` runs the module's own torch forward (its quantized math, never slimlm's
C++ decode kernels: :func:`kernels_allowed` is False meanwhile) without recording a graph, and
saves nothing but the module; backward de-quantizes the weight once (in the gradient's dtype; a
weight pinned for calibration is reused) and runs one matmul. ``QuantLinearBase.forward`` calls it
whenever grad is enabled and ``x`` requires grad; sparse linears on the CSR path call it too.

Run the oracle tests: ``.venv/bin/python -m pytest tests/models/test_grad_quant.py``
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch
from torch import nn

_NO_KERNELS: contextvars.ContextVar[bool] = contextvars.ContextVar("slimlm_no_kernels", default=False)


def kernels_allowed() -> bool:
    """False while a training forward runs a module's math (the C++ decode kernels serve inference only)."""
    return not _NO_KERNELS.get()


def needs_input_grad(x: torch.Tensor) -> bool:
    """A training-mode call: grad enabled and ``x`` part of a graph."""
    return torch.is_grad_enabled() and x.requires_grad


def _backward_weight(mod: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The de-quantized weight ``[out, in]`` in ``dtype``: the pinned copy when there is one."""
    w = mod.__dict__.get("_pinned_dense")
    if w is None:
        w = mod.dense_weight()  # type: ignore[operator]
    return w.to(dtype)  # type: ignore[no-any-return]


class _FrozenLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, mod: nn.Module, fn: Any) -> torch.Tensor:
        # x: [..., in] -> [..., out]; grad mode is off here, so ``fn`` records no graph
        ctx.mod, ctx.x_dtype = mod, x.dtype
        token = _NO_KERNELS.set(True)
        try:
            return fn(x)  # type: ignore[no-any-return]
        finally:
            _NO_KERNELS.reset(token)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        # gy: [..., out] -> gx = gy @ W: [..., in]
        dt = gy.dtype if gy.dtype in (torch.float32, torch.bfloat16, torch.float64) else torch.float32
        w = _backward_weight(ctx.mod, dt)
        gx = gy.to(dt).reshape(-1, w.shape[0]) @ w  # [M, in]
        return gx.reshape(*gy.shape[:-1], w.shape[1]).to(ctx.x_dtype), None, None


def frozen_linear(mod: nn.Module, x: torch.Tensor, fn: Any | None = None) -> torch.Tensor:
    """``fn(x)`` (default ``mod.forward``) with a backward that gives ``x`` the dense twin's gradient.

    ``mod`` must offer ``dense_weight() -> [out, in]``; its own tensors are treated as constants.
    """
    return _FrozenLinear.apply(x, mod, mod.forward if fn is None else fn)  # type: ignore[no-any-return]
