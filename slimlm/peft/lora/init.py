"""LoRA initializations that use the base weight: PiSSA and LoftQ (pure functions on ``[out, in]``).

PiSSA (Meng et al. 2024) puts the top-r singular triplets of ``W = U S V^T`` into the adapter and
leaves the residual in the base: ``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)``,
``W_res = W - s B A`` (``s`` the LoRA scaling), so the adapted layer starts equal to ``W`` and
training moves the principal directions. Same operations, in the same order, as peft's
``init_lora_weights="pissa"``.

LoftQ (Li et al. 2023) alternates ``Q_t = quant(W - s B_{t-1} A_{t-1})`` and
``s B_t A_t = SVD_r(W - Q_t)`` for T rounds: the base becomes ``Q_T`` and the adapter absorbs the
quantization error, so ``||W - (Q + s B A)|| <= ||W - quant(W)||``. The quantizers are slimlm's
own (:mod:`slimlm.quant.nf4`, :mod:`slimlm.quant.primitives`); the singular values are divided by
``s`` as for PiSSA, so the result does not depend on ``lora_alpha`` (peft leaves them unscaled,
the same when ``lora_alpha == r``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimlm.utils.errors import ConfigError


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int, scaling: float
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) with ``scaling * B @ A`` the rank-r truncation ``U_r S_r V_r^T``."""
    sr = s[:r] / scaling
    a = torch.diag(torch.sqrt(sr)) @ vh[:r]
    b = u[:, :r] @ torch.diag(torch.sqrt(sr))
    return a, b


@torch.no_grad()
def pissa_init(w: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w: [out, in] float32 -> (A [r, in], B [out, r], residual base [out, in])."""
    u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
    a, b = _split(u, s, vh, r, scaling)
    return a, b, w.float() - scaling * b @ a


Quantizer = Callable[[torch.Tensor, torch.Tensor | None], nn.Module]  # (w [out, in], bias) -> quantized linear


def loftq_quantizer(name: str, group_size: int = 64) -> Quantizer:
    """slimlm's ``nf4`` (block 64, no double quantization) or ``int4`` (symmetric RTN in groups)."""
    from slimlm.quant.linear import Int4WeightLinear, NF4Linear
    from slimlm.quant.nf4 import quantize_nf4
    from slimlm.quant.primitives import quantize_weight

    if name == "nf4":
        return lambda w, bias: NF4Linear.from_quantized(quantize_nf4(w, 64, double_quant=False), bias=bias)
    if name == "int4":
        return lambda w, bias: Int4WeightLinear.from_quantized(
            quantize_weight(w, 4, group_size, symmetric=True, ragged=w.shape[1] % group_size != 0), bias=bias)
    raise ConfigError(f"LoftQ quantizer must be nf4 or int4, got {name!r}")


@torch.no_grad()
def loftq_init(w: torch.Tensor, bias: torch.Tensor | None, r: int, scaling: float, quantize: Quantizer,
               iters: int = 1) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """w: [out, in] float32 -> (quantized base module, A [r, in], B [out, r])."""
    if iters < 1:
        raise ConfigError(f"loftq_iter must be >= 1, got {iters}")
    w = w.float()
    target = w
    for _ in range(iters):
        q = quantize(target, bias)
        u, s, vh = torch.linalg.svd(w - q.dense_weight(), full_matrices=False)  # type: ignore[operator]
        a, b = _split(u, s, vh, r, scaling)
        target = w - scaling * b @ a
    return q, a, b
