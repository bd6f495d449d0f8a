"""AdamW with 8-bit block-wise quantized moments (Dettmers et al. 2022), about a quarter of AdamW's
optimizer memory: 2 bytes + 8/256 bytes of scales per parameter instead of 8 bytes.

Each step de-quantizes a parameter's moments to fp32, runs exactly torch's AdamW update on them
(decoupled weight decay, bias-corrected ``lr / (1 - b1^t)`` and ``sqrt(v) / sqrt(1 - b2^t) + eps``), and
quantizes them back (:mod:`slimlm.train.optim.blockwise`: blocks of 256, absmax scale, the signed
dynamic code for m and the unsigned one for v). Tensors with fewer than ``min_8bit_size`` elements
(norms, biases) keep fp32 moments, where the saving is nil and the error not worth it.

State per 8-bit parameter: ``exp_avg_codes``/``exp_avg_sq_codes`` uint8 (numel,) and
``exp_avg_absmax``/``exp_avg_sq_absmax`` fp32 (ceil(numel/256),). Same keyword arguments as
``torch.optim.AdamW`` (no amsgrad). ``build_optimizer("adamw8bit", model.parameters(), lr=1e-4)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from slimlm.train.optim import register_optimizer
from slimlm.train.optim._base import SlimOptimizer, check_common
from slimlm.train.optim.blockwise import dequantize_blockwise, quantize_blockwise
from slimlm.utils.errors import ConfigError


class AdamW8bit(SlimOptimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, min_8bit_size: int = 4096) -> None:
        check_common(lr, weight_decay, betas)
        if not eps >= 0.0 or min_8bit_size < 0:
            raise ConfigError(f"eps and min_8bit_size must be >= 0, got {eps}, {min_8bit_size}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay,
                    "min_8bit_size": min_8bit_size}
        super().__init__(params, defaults)

    @staticmethod
    def moments(state: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 (m, v) of one parameter's state, flat (numel,) for 8-bit states."""
        if "exp_avg_codes" in state:
            return (dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], signed=True),
                    dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], signed=False))
        return state["exp_avg"], state["exp_avg_sq"]

    def _update(self) -> None:
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                quantized = p.numel() >= group["min_8bit_size"]
                if not state:
                    state["step"] = 0
                    zeros = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
                    if quantized:
                        state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(zeros, True)
                        state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(zeros, False)
                    else:
                        state["exp_avg"], state["exp_avg_sq"] = zeros, zeros.clone()
                state["step"] += 1
                t = state["step"]
                g = p.grad.reshape(-1).float()
                m, v = self.moments(state)
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                denom = (v.sqrt() / math.sqrt(1.0 - b2 ** t)).add_(eps)
                w = p.view(-1).float() if p.dtype != torch.float32 else p.view(-1)
                if wd != 0.0:
                    w.mul_(1.0 - lr * wd)
                w.addcdiv_(m, denom, value=-lr / (1.0 - b1 ** t))
                if w.data_ptr() != p.data_ptr():
                    p.copy_(w.view_as(p))
                if quantized:
                    state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(m, True)
                    state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(v, False)


register_optimizer("adamw8bit")(AdamW8bit)
