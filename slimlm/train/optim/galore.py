"""GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"):
Adam whose moments live in a rank-r subspace of each weight matrix's gradient, full-parameter training
with optimizer memory ~ 2·r·max(n, m) + r·min(n, m) per (n x m) matrix instead of 2·n·m.

For a matrix parameter W (n x m) with gradient G, every ``update_proj_gap`` steps (at t = 0, T, 2T, ...)
the projector P is refreshed from the SVD of the current gradient, G = U S V^T:

    n >= m:  P = V[:, :r]^T (r x m),  R = G P^T (n x r),  W -= lr * scale * N P
    n <  m:  P = U[:, :r]   (n x r),  R = P^T G (r x m),  W -= lr * scale * P N

where N = Adam's normalised step on the projected gradient R (moments of R's shape, kept across projector
refreshes as in the paper), with the bias correction folded into the step size:
``N = m / (sqrt(v) + eps) * sqrt(1 - b2^t) / (1 - b1^t)``. Decoupled weight decay ``W -= lr * wd * W`` is
applied after the update. This is the authors' update (``galore_torch.GaLoreAdamW``, projection "std").

Matrices whose smaller side is <= ``rank`` (no saving) and non-matrix parameters get the same Adam
update without projection; a param group with ``"galore": False`` opts out (e.g. embeddings).
``build_optimizer("galore", model.parameters(), lr=1e-3, rank=128, update_proj_gap=200, scale=0.25)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from slimlm.train.optim import register_optimizer
from slimlm.train.optim._base import SlimOptimizer, check_common
from slimlm.utils.errors import ConfigError


def _projector(g: torch.Tensor, rank: int) -> torch.Tensor:
    """The rank-r orthonormal factor on the smaller side of g (n x m): (r, m) if n >= m else (n, r)."""
    u, _, vh = torch.linalg.svd(g.float(), full_matrices=False)
    return vh[:rank, :] if g.shape[0] >= g.shape[1] else u[:, :rank]


class GaLoreAdamW(SlimOptimizer):
    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, rank: int = 128, update_proj_gap: int = 200,
                 scale: float = 0.25) -> None:
        check_common(lr, weight_decay, betas)
        if rank < 1 or update_proj_gap < 1:
            raise ConfigError(f"rank and update_proj_gap must be >= 1, got {rank}, {update_proj_gap}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "rank": rank,
                    "update_proj_gap": update_proj_gap, "scale": scale, "galore": True}
        super().__init__(params, defaults)

    @staticmethod
    def projected(group: dict[str, Any], p: torch.Tensor) -> bool:
        return bool(group["galore"]) and p.dim() == 2 and min(p.shape) > group["rank"]

    def _update(self) -> None:
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                g = p.grad.float()
                if not state:
                    state["step"] = 0
                proj = self.projected(group, p)
                if proj:
                    if state["step"] % group["update_proj_gap"] == 0:
                        state["projector"] = _projector(g, group["rank"])
                    P = state["projector"]
                    tall = p.shape[0] >= p.shape[1]
                    g = g @ P.T if tall else P.T @ g  # (n, r) or (r, m)
                if "exp_avg" not in state:
                    state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(g), torch.zeros_like(g)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                t = state["step"]
                m.mul_(b1).add_(g, alpha=1.0 - b1)
                v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
                step_size = group["lr"] * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
                n = m / v.sqrt().add_(group["eps"])
                if proj:
                    n = (n @ P if tall else P @ n) * group["scale"]
                p.add_(n.to(p.dtype), alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])


register_optimizer("galore")(GaLoreAdamW)
