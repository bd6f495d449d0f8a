"""CAME (Luo et al. 2023, "CAME: Confidence-guided Adaptive Memory Efficient Optimization").

Adafactor's factored second moment (a row and a column vector per matrix instead of a full tensor) plus
momentum, made stable by a confidence term: the EMA of the squared difference between this step's update
and the momentum, also factored. Memory per (n x m) matrix: one full momentum plus 2*(n + m) floats, so
about half of AdamW's.

Per parameter with gradient g (matrices; vectors keep full, unfactored EMAs)::

    r = b2 r + (1-b2) mean_cols(g^2 + eps1);   c = b2 c + (1-b2) mean_rows(g^2 + eps1)
    u = g / sqrt(r c^T / mean(r))                        # factored RMS normalisation
    u = u / max(1, RMS(u) / clip_threshold)
    m = b1 m + (1-b1) u
    s = (u - m)^2 + eps2                                 # instability
    R = b3 R + (1-b3) mean_cols(s);   C = b3 C + (1-b3) mean_rows(s)
    p = p - lr * weight_decay * p - lr * m / sqrt(R C^T / mean(R))

There is no bias correction (as in the paper's algorithm and its authors' code). The paper's defaults:
``betas=(0.9, 0.999, 0.9999)``, ``eps=(1e-30, 1e-16)``, lr about 2e-4.
``build_optimizer("came", model.parameters(), lr=2e-4)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from slimlm.train.optim import register_optimizer
from slimlm.train.optim._base import SlimOptimizer, check_common


def _ema_factored(row: torch.Tensor, col: torch.Tensor, x: torch.Tensor, beta: float) -> torch.Tensor:
    """Update the row/column EMAs of x (..., n, m) and return the rank-1 inverse root (..., n, m)."""
    row.mul_(beta).add_(x.mean(dim=-1), alpha=1.0 - beta)  # (..., n)
    col.mul_(beta).add_(x.mean(dim=-2), alpha=1.0 - beta)  # (..., m)
    r = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
    return r * col.unsqueeze(-2).rsqrt()


def _rms(x: torch.Tensor) -> torch.Tensor:
    return x.norm(2) / (x.numel() ** 0.5)


class CAME(SlimOptimizer):
    def __init__(self, params: Iterable[Any], lr: float = 2e-4, eps: tuple[float, float] = (1e-30, 1e-16),
                 clip_threshold: float = 1.0, betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
                 weight_decay: float = 0.0) -> None:
        check_common(lr, weight_decay, betas)
        defaults = {"lr": lr, "eps": tuple(eps), "clip_threshold": clip_threshold, "betas": tuple(betas),
                    "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _update(self) -> None:
        for group in self.param_groups:
            b1, b2, b3 = group["betas"]
            eps1, eps2 = group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.float()
                factored = g.dim() >= 2
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(g)
                    if factored:
                        for k in ("exp_avg_sq_row", "exp_avg_res_row"):
                            state[k] = g.new_zeros(g.shape[:-1])
                        for k in ("exp_avg_sq_col", "exp_avg_res_col"):
                            state[k] = g.new_zeros(g.shape[:-2] + g.shape[-1:])
                    else:
                        state["exp_avg_sq"] = torch.zeros_like(g)
                state["step"] += 1
                sq = g.square().add_(eps1)
                if factored:
                    u = _ema_factored(state["exp_avg_sq_row"], state["exp_avg_sq_col"], sq, b2).mul_(g)
                else:
                    u = state["exp_avg_sq"].mul_(b2).add_(sq, alpha=1.0 - b2).rsqrt().mul_(g)
                u.div_((_rms(u) / group["clip_threshold"]).clamp_(min=1.0))
                m = state["exp_avg"].mul_(b1).add_(u, alpha=1.0 - b1)
                if factored:
                    res = (u - m).square_().add_(eps2)
                    u = _ema_factored(state["exp_avg_res_row"], state["exp_avg_res_col"], res, b3).mul_(m)
                else:
                    u = m.clone()
                if group["weight_decay"] != 0.0:
                    p.add_(p, alpha=-group["weight_decay"] * group["lr"])
                p.add_(u.mul_(group["lr"]).to(p.dtype), alpha=-1.0)


register_optimizer("came")(CAME)
