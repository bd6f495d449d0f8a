"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign of an interpolated
momentum, one state tensor per parameter (half of AdamW's optimizer memory).

Per parameter, with gradient g and momentum m (zeros at the start)::

    c = beta1 * m + (1 - beta1) * g
    p = p * (1 - lr * weight_decay) - lr * sign(c)
    m = beta2 * m + (1 - beta2) * g

Use a learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger (the paper's advice).
``build_optimizer("lion", model.parameters(), lr=3e-5, weight_decay=0.1)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from slimlm.train.optim import register_optimizer
from slimlm.train.optim._base import SlimOptimizer, check_common


class Lion(SlimOptimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0) -> None:
        check_common(lr, weight_decay, betas)
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    def _update(self) -> None:
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                if wd != 0.0:
                    p.mul_(1.0 - lr * wd)
                p.add_(m.mul(beta1).add_(p.grad, alpha=1.0 - beta1).sign_(), alpha=-lr)
                m.mul_(beta2).add_(p.grad, alpha=1.0 - beta2)


register_optimizer("lion")(Lion)
