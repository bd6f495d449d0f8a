"""SmoothQuant (Xiao et al., 2022) + W8A8: migrate activation outliers into the weights, then int8
weights (per output channel, symmetric) and int8 activations (per token, dynamic).

For linears sharing an input (q/k/v, gate/up, and up -> down / v -> o when foldable), the per-channel
smoothing factor is ``s_j = max|x_j|^alpha / max|W_:j|^(1 - alpha)`` (max over calibration tokens,
and over the group's weights); ``1/s`` is folded into the preceding norm or linear and ``s`` into the
weights, so activations lose their outlier channels and per-token int8 becomes accurate. Every
selected linear of the layer then becomes a ``W8A8Linear``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from slimlm.calib.driver import run_layerwise
from slimlm.quant.config import QuantConfigBase
from slimlm.quant.methods.awq import fold_scale, preceding
from slimlm.quant.methods.base import _bias, layer_groups, layer_prefix, register_method, runtime_class
from slimlm.quant.primitives import quantize_weight
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import ConfigError


@dataclass
class SmoothQuantConfig(QuantConfigBase):
    kind = "smoothquant"
    alpha: float = field(default=0.5, metadata={"min": 0, "max": 1, "help": "migration strength (0 = none, 1 = all into weights)"})
    smooth: bool = field(default=True, metadata={"help": "apply smoothing (False = plain W8A8)"})

    def validate(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"smoothquant: alpha must be in [0, 1], got {self.alpha}")
        super().validate()


# --- pure functions -----------------------------------------------------------------------------
def smoothing_scale(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """``s = act_max^alpha / w_max^(1-alpha)`` per input channel; ``act_max: [in]``, weights [out_i, in]."""
    w_max = torch.stack([w.detach().float().abs().amax(dim=0) for w in weights]).amax(dim=0)  # [in]
    s = act_max.float().clamp(min=1e-5).pow(alpha) / w_max.clamp(min=1e-5).pow(1 - alpha)
    return s.clamp(min=1e-5)


def w8a8_weight(w: torch.Tensor) -> QuantizedWeight:
    """Per-output-channel symmetric int8 weight (codes 0..255 around zero 128)."""
    return quantize_weight(w, 8, -1, symmetric=True)


def w8a8_module(linear: nn.Linear) -> nn.Module:
    qw = w8a8_weight(linear.weight)
    return runtime_class("W8A8Linear").from_quantized(qw, bias=_bias(linear))  # type: ignore[no-any-return]


# --- driver glue ----------------------------------------------------------------------------------
class SmoothQuantAlgorithm:
    name = "smoothquant"
    sequential = False

    def __init__(self, cfg: SmoothQuantConfig) -> None:
        self.cfg = cfg
        self.act_max: dict[str, torch.Tensor] = {}
        self.pending: list[str] = []
        self.scales: dict[str, torch.Tensor] = {}

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        pre = layer_prefix(layer_idx)
        groups = [[p for p in grp if self.cfg.for_module(pre + p) is not None] for grp in layer_groups(layer)]
        return [grp for grp in groups if grp]

    def begin_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self.act_max, self.pending = {}, []

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        m = x.abs().amax(dim=0)  # [in]
        old = self.act_max.get(path)
        self.act_max[path] = m if old is None else torch.maximum(old, m)

    def finish_group(self, layer_idx: int, layer: nn.Module, paths: list[str]) -> None:
        prev = preceding(layer, paths) if self.cfg.smooth else None
        if prev is not None:
            lins = [cast(nn.Linear, layer.get_submodule(p)) for p in paths]
            s = smoothing_scale(self.act_max[paths[0]], [lin.weight for lin in lins], self.cfg.alpha)
            fold_scale(prev, lins, s)
            self.scales[layer_prefix(layer_idx) + paths[0]] = s
        self.pending.extend(paths)

    def end_layer(self, layer_idx: int, layer: nn.Module) -> None:
        for p in self.pending:
            lin = layer.get_submodule(p)
            assert isinstance(lin, nn.Linear)
            layer.set_submodule(p, w8a8_module(lin))
        self.pending, self.act_max = [], {}


@register_method(SmoothQuantConfig, calibrated=True)
def _apply_smoothquant(model: nn.Module, cfg: SmoothQuantConfig, samples: Sequence[torch.Tensor] | None,
                       progress: bool) -> None:
    assert samples is not None
    run_layerwise(model, samples, SmoothQuantAlgorithm(cfg), progress=progress)  # type: ignore[arg-type]
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and not name.startswith("model.layers.") and cfg.for_module(name) is not None:
            model.set_submodule(name, w8a8_module(m))
