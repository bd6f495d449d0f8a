"""``LowRankLinear``: ``W ~= U V^T`` stored as two linears (kind ``"lowrank"``).

``down`` holds ``V^T`` ``[rank, in]`` and ``up`` holds ``U`` ``[out, rank]`` (+ the original bias),
so ``y = up(down(x))`` costs ``rank * (in + out)`` multiply-adds instead of ``in * out``: a real
parameter and FLOP saving whenever ``rank < in * out / (in + out)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.models.modules import SwappableLinear, register_linear_kind
from slimlm.utils.errors import CheckpointError, ConfigError


@register_linear_kind
class LowRankLinear(SwappableLinear):
    kind = "lowrank"

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        if not 1 <= rank <= min(in_features, out_features):
            raise ConfigError(f"rank {rank} must be in [1, min(out, in) = {min(in_features, out_features)}]")
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype)  # V^T: [rank, in]
        self.up = nn.Linear(rank, out_features, bias=bias, dtype=dtype)  # U: [out, rank]

    @property
    def bias(self) -> torch.Tensor | None:  # type: ignore[override]
        return self.up.bias

    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> LowRankLinear:
        if "rank" not in spec:
            raise CheckpointError("lowrank linear spec lacks 'rank'")
        return cls(in_features, out_features, int(spec["rank"]), bias)

    def spec(self) -> dict[str, Any]:
        return {"rank": self.rank}

    @classmethod
    @torch.no_grad()
    def from_factors(cls, up: torch.Tensor, down: torch.Tensor, bias: torch.Tensor | None,
                     dtype: torch.dtype = torch.float32) -> LowRankLinear:
        """``up: [out, r]``, ``down: [r, in]``."""
        mod = cls(down.shape[1], up.shape[0], up.shape[1], bias is not None, dtype)
        mod.up.weight.copy_(up)
        mod.down.weight.copy_(down)
        if bias is not None and mod.up.bias is not None:
            mod.up.bias.copy_(bias.detach())
        mod.requires_grad_(False)
        return mod

    def dense_weight(self) -> torch.Tensor:
        return (self.up.weight.float() @ self.down.weight.float()).detach()  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., rank] -> [..., out]
        wd = self.up.weight.dtype
        if x.dtype != wd:  # factors keep their stored dtype when the model loads in another one
            return self.up(self.down(x.to(wd))).to(x.dtype)
        return self.up(self.down(x))

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}"
