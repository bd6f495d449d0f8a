"""Glue shared by the quantization methods: method registration, linear groups, module building.

A method registers its in-place handler for its config type (torchao style)::

    @register_method(RTNConfig, calibrated=False)
    def _apply_rtn(model, cfg, samples, progress): ...

which also registers the method in the one transform registry (:mod:`slimlm.transforms`) with
:func:`slimlm.quant.api.quantize_` as its entry point. ``quantize_`` looks the handler up by the
config's kind and may chain several methods (a recipe's stages). Calibrated methods build a
``LayerwiseAlgorithm`` and hand it to the one driver, :func:`slimlm.calib.driver.run_layerwise`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimlm.quant.config import QuantConfigBase
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.transforms.registry import register_transform
from slimlm.transforms.report import TransformReport
from slimlm.transforms.select import SHARED_INPUT_GROUPS

Handler = Callable[[nn.Module, Any, Sequence[torch.Tensor] | None, bool], None]


@dataclass
class MethodEntry:
    config_cls: type[QuantConfigBase]
    handler: Handler
    calibrated: bool


_METHODS: dict[str, MethodEntry] = {}


def _quantize(model: nn.Module, cfg: Any, samples: Sequence[torch.Tensor] | None, progress: bool) -> TransformReport:
    from slimlm.quant.api import quantize_

    return quantize_(model, cfg, samples, progress)


def register_method(config_cls: type[QuantConfigBase], calibrated: bool) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        register_transform(config_cls, apply=_quantize, calibrated=calibrated)  # refuses a duplicate name
        _METHODS[config_cls.kind] = MethodEntry(config_cls, fn, calibrated)
        return fn

    return deco


def methods() -> dict[str, MethodEntry]:
    """Registered methods by kind (importing :mod:`slimlm.quant.methods` registers them all)."""
    return dict(_METHODS)


# --- which linears, in which groups -------------------------------------------------------------


def layer_groups(layer: nn.Module) -> list[list[str]]:
    """Groups of plain ``nn.Linear`` paths in ``layer`` sharing an input; other linears appended alone."""
    present = {n for n, m in layer.named_modules() if type(m) is nn.Linear}
    groups = [[p for p in g if p in present] for g in SHARED_INPUT_GROUPS]
    known = {p for g in SHARED_INPUT_GROUPS for p in g}
    extra = [[p] for p in sorted(present - known)]
    return [g for g in groups if g] + extra


def layer_prefix(layer_idx: int) -> str:
    return f"model.layers.{layer_idx}."


def top_level_linears(model: nn.Module) -> list[str]:
    """Plain linears outside the decoder layers (``lm_head``)."""
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and not n.startswith("model.layers.")]


# --- building runtime modules ---------------------------------------------------------------------
def weight_module(linear: nn.Linear, qw: QuantizedWeight) -> nn.Module:
    """The packed runtime module for an integer weight-only ``qw`` (int8 / int4 / 2-3-5-6-7-bit)."""
    name = {8: "Int8WeightLinear", 4: "Int4WeightLinear"}.get(qw.bits, "IntxWeightLinear")
    return runtime_class(name).from_quantized(qw, bias=_bias(linear))  # type: ignore[no-any-return]


def runtime_class(name: str) -> Any:
    """The storage module class ``slimlm.quant.linear.<name>``."""
    import slimlm.quant.linear as lin

    return getattr(lin, name)


def _bias(linear: nn.Linear) -> torch.Tensor | None:
    return None if linear.bias is None else linear.bias.detach().float()
