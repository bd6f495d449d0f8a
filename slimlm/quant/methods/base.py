"""Glue shared by the quantization methods: method registry, linear groups, module building.

A method registers a handler for its config type (torchao style)::

    @register_method(RTNConfig, calibrated=False)
    def _apply_rtn(model, cfg, samples, progress): ...

:func:`slimlm.quant.api.quantize_` looks the handler up by ``type(config)``. Calibrated methods build a
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

Handler = Callable[[nn.Module, Any, Sequence[torch.Tensor] | None, bool], None]


@dataclass
class MethodEntry:
    config_cls: type[QuantConfigBase]
    handler: Handler
    calibrated: bool


_METHODS: dict[str, MethodEntry] = {}


def register_method(config_cls: type[QuantConfigBase], calibrated: bool) -> Callable[[Handler], Handler]:
    def deco(fn: Handler) -> Handler:
        _METHODS[config_cls.kind] = MethodEntry(config_cls, fn, calibrated)
        return fn

    return deco


def methods() -> dict[str, MethodEntry]:
    """Registered methods by kind (importing :mod:`slimlm.quant.methods` registers them all)."""
    return dict(_METHODS)


# --- which linears, in which groups -------------------------------------------------------------
# Linears that read the same input, in forward order (runtime names, relative to a decoder layer).
SHARED_INPUT_GROUPS: list[list[str]] = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


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


def replace_module(root: nn.Module, path: str, new: nn.Module) -> None:
    root.set_submodule(path, new)
