"""LLM.int8() (Dettmers et al., 2022): int8 matmul with outlier input features kept in high precision.

Calibration finds the input columns whose activation magnitude exceeds ``threshold`` (6.0) on any
calibration token (per linear); those weight columns stay in floating point, every other column
is int8 (per output row, symmetric), and activations of the regular columns are quantized per token
at run time by ``Int8OutlierLinear``. (The paper picks outliers per batch at run time; choosing
them once from calibration keeps the kernel static, and a column set is what the module stores.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from slimlm.calib.driver import run_layerwise
from slimlm.quant.config import QuantConfigBase
from slimlm.quant.methods.base import _bias, layer_groups, layer_prefix, register_method, runtime_class
from slimlm.quant.primitives import quantize_per_token_int8, quantize_weight
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import ConfigError


@dataclass
class Int8OutlierConfig(QuantConfigBase):
    kind = "int8-outlier"
    threshold: float = field(default=6.0, metadata={"gt": 0, "help": "|x| above which an input feature is an outlier"})
    max_outlier_fraction: float = field(
        default=0.25, metadata={"min": 0, "max": 1, "help": "keep at most this fraction of columns in high precision (largest first)"}
    )

    def validate(self) -> None:
        if self.threshold <= 0:
            raise ConfigError(f"int8-outlier: threshold must be positive, got {self.threshold}")
        if not 0 <= self.max_outlier_fraction <= 1:
            raise ConfigError("int8-outlier: max_outlier_fraction must be in [0, 1]")
        super().validate()


# --- pure functions -----------------------------------------------------------------------------
def outlier_columns(act_max: torch.Tensor, threshold: float, max_fraction: float = 1.0) -> torch.Tensor:
    """Sorted indices of columns with ``act_max > threshold`` (the largest ``max_fraction`` of them)."""
    idx = torch.nonzero(act_max > threshold).flatten()
    cap = int(max_fraction * act_max.numel())
    if idx.numel() > cap:
        idx = idx[torch.argsort(act_max[idx], descending=True)[:cap]]
    return torch.sort(idx).values


def split_outliers(w: torch.Tensor, cols: torch.Tensor) -> tuple[QuantizedWeight, torch.Tensor]:
    """int8 weight of the regular columns (outlier columns zeroed) and the fp outlier columns [out, k]."""
    regular = w.detach().float().clone()
    regular[:, cols] = 0.0
    return quantize_weight(regular, 8, -1, symmetric=True), w.detach().float()[:, cols].clone()


def int8_outlier_reference(x: torch.Tensor, qw: QuantizedWeight, cols: torch.Tensor, w_out: torch.Tensor) -> torch.Tensor:
    """What the module computes: ``x: [N, in] -> [N, out]`` (int8 regular part + fp outlier part)."""
    xr = x.float().clone()
    xr[:, cols] = 0.0
    q, s = quantize_per_token_int8(xr)
    return (q.float() * s) @ qw.dequantize().t() + x.float()[:, cols] @ w_out.t()


def outlier_module(linear: nn.Linear, cols: torch.Tensor) -> nn.Module:
    qw, w_out = split_outliers(linear.weight, cols)
    return runtime_class("Int8OutlierLinear").from_quantized(qw, cols, w_out, bias=_bias(linear))  # type: ignore[no-any-return]


# --- driver glue ----------------------------------------------------------------------------------
class Int8OutlierAlgorithm:
    name = "int8-outlier"
    sequential = False

    def __init__(self, cfg: Int8OutlierConfig) -> None:
        self.cfg = cfg
        self.act_max: dict[str, torch.Tensor] = {}
        self.n_outliers: dict[str, int] = {}

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        pre = layer_prefix(layer_idx)
        groups = [[p for p in grp if self.cfg.for_module(pre + p) is not None] for grp in layer_groups(layer)]
        return [grp for grp in groups if grp]

    def begin_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self.act_max = {}

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        m = x.abs().amax(dim=0)  # [in]
        old = self.act_max.get(path)
        self.act_max[path] = m if old is None else torch.maximum(old, m)

    def finish_group(self, layer_idx: int, layer: nn.Module, paths: list[str]) -> None:
        for p in paths:
            lin = layer.get_submodule(p)
            assert isinstance(lin, nn.Linear)
            cols = outlier_columns(self.act_max.pop(p), self.cfg.threshold, self.cfg.max_outlier_fraction)
            self.n_outliers[layer_prefix(layer_idx) + p] = int(cols.numel())
            layer.set_submodule(p, outlier_module(lin, cols))

    def end_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self.act_max = {}


@register_method(Int8OutlierConfig, calibrated=True)
def _apply_int8_outlier(model: nn.Module, cfg: Int8OutlierConfig, samples: Sequence[torch.Tensor] | None,
                        progress: bool) -> None:
    assert samples is not None
    run_layerwise(model, samples, Int8OutlierAlgorithm(cfg), progress=progress)  # type: ignore[arg-type]
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear and not name.startswith("model.layers.") and cfg.for_module(name) is not None:
            model.set_submodule(name, outlier_module(m, torch.zeros(0, dtype=torch.long)))
