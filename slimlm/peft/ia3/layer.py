"""``IA3Linear``: a frozen base linear whose input (feed-forward) or output (others) is rescaled by a
learned vector ``ia3_l`` (peft's name): ``y = base(x * l)`` with ``l: [1, in]``, or ``y = base(x) * l``
with ``l: [out, 1]``. Merging folds ``l`` into the weight (and, for output scaling, the bias)."""

from __future__ import annotations

import torch
from torch import nn

from slimlm.models.autocast import matmul_input
from slimlm.peft.base import AdapterLayer


class IA3Linear(AdapterLayer):
    def __init__(self, base: nn.Module, feedforward: bool, init_ones: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)  # type: ignore[arg-type]
        self.is_feedforward = feedforward
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, dtype=dtype) if init_ones else torch.randn(shape, dtype=dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        if self.merged:
            return self.base_layer(x)  # type: ignore[no-any-return]
        lv = self.ia3_l.flatten()
        if self.is_feedforward:
            return self.base_layer((x.to(lv.dtype) * lv).to(x.dtype))  # type: ignore[no-any-return]
        y = self.base_layer(matmul_input(self.base_layer, x))  # the shared bf16 copy under autocast
        return (y * lv).to(y.dtype)  # type: ignore[no-any-return]

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"ia3_l": self.ia3_l}

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.ia3_l.detach().float()  # [out, in] * [1, in] or [out, 1]

    def merged_bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        if b is None or self.is_feedforward:
            return b
        return b * self.ia3_l.detach().float().flatten()

    def _unfold(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        lv = self.ia3_l.detach().float()
        if b is not None and not self.is_feedforward:
            b = b / lv.flatten()
        return w / lv, b

    def extra_repr(self) -> str:
        return f"feedforward={self.is_feedforward}, merged={self.merged}"
