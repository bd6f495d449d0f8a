"""``HoulsbyLinear``: a frozen projection followed by a residual bottleneck ``y + up(act(down(y)))``
(``adapter_down: [m, out]``, ``adapter_up: [out, m]``, both with bias). Not a weight update: it
cannot be merged (unload removes it)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.peft.base import AdapterLayer
from slimlm.utils.errors import ConfigError, SlimlmError

_ACT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu,
                                                          "tanh": torch.tanh}


class HoulsbyLinear(AdapterLayer):
    def __init__(self, base: nn.Module, size: int, act: str = "relu", dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)  # type: ignore[arg-type]
        if size > self.out_features:
            raise ConfigError(f"bottleneck_size {size} is wider than the layer's output ({self.out_features})")
        self.act_name = act
        self.adapter_down = nn.Linear(self.out_features, size, dtype=dtype)  # [m, out]
        self.adapter_up = nn.Linear(size, self.out_features, dtype=dtype)  # [out, m]
        self.adapter_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        with torch.no_grad():  # down as nn.Linear; up zero: the adapter starts as the identity
            nn.init.kaiming_uniform_(self.adapter_down.weight, a=math.sqrt(5))
            nn.init.zeros_(self.adapter_up.weight)
            nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        y = self.base_layer(x)
        h = y.to(self.adapter_down.weight.dtype)
        z = self.adapter_up(self.adapter_dropout(_ACT[self.act_name](self.adapter_down(h))))
        return y + z.to(y.dtype)  # type: ignore[no-any-return]

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"adapter_down.weight": self.adapter_down.weight, "adapter_down.bias": self.adapter_down.bias,
                "adapter_up.weight": self.adapter_up.weight, "adapter_up.bias": self.adapter_up.bias}

    def check_mergeable(self) -> None:
        raise SlimlmError("a bottleneck adapter is not a weight update: it cannot be merged (unload removes it)")

    def extra_repr(self) -> str:
        return f"bottleneck={self.adapter_down.out_features}, act={self.act_name}"
