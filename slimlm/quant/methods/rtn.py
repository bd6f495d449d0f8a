"""RTN: round-to-nearest weight-only quantization (no calibration data).

Every selected linear's weight is quantized with :func:`slimlm.quant.primitives.quantize_weight`
(min/max or absmax grid per tensor / channel / group, optional MSE clipping search) and replaced by
the packed runtime module for its bit width. Calibrated weight-only methods (GPTQ, AWQ) reuse
:func:`quantize_top_level` for linears outside the decoder layers (``lm_head`` when not ignored).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.quant.config import WeightQuantConfig
from slimlm.quant.methods.base import register_method, top_level_linears, weight_module
from slimlm.quant.primitives import quantize_weight, resolve_group_size


@dataclass
class RTNConfig(WeightQuantConfig):
    kind = "rtn"
    clip_search: bool = field(default=False, metadata={"help": "MSE search of the grid range per group"})


def rtn_linear(linear: nn.Linear, cfg: WeightQuantConfig, path: str) -> nn.Module:
    clip = bool(getattr(cfg, "clip_search", False))
    qw = quantize_weight(linear.weight, cfg.bits, cfg.group_size, cfg.symmetric, clip_search=clip)
    return weight_module(linear, qw)


def selected_linears(model: nn.Module, cfg: WeightQuantConfig) -> list[tuple[str, WeightQuantConfig]]:
    out = []
    for name, m in model.named_modules():
        if type(m) is nn.Linear:
            c = cfg.for_module(name)
            if c is not None:
                resolve_group_size(m.in_features, c.group_size, name)  # fail before changing anything
                out.append((name, c))
    return out


def quantize_top_level(model: nn.Module, cfg: WeightQuantConfig) -> None:
    """RTN for the selected linears outside the decoder layers (e.g. a not-ignored ``lm_head``)."""
    for name in top_level_linears(model):
        c = cfg.for_module(name)
        if c is not None:
            lin = model.get_submodule(name)
            assert isinstance(lin, nn.Linear)
            model.set_submodule(name, rtn_linear(lin, c, name))


@register_method(RTNConfig, calibrated=False)
def _apply_rtn(model: nn.Module, cfg: RTNConfig, samples: Sequence[torch.Tensor] | None, progress: bool) -> None:
    todo = selected_linears(model, cfg)
    for name, c in tqdm(todo, desc="rtn: linears", unit="linear", disable=not progress, dynamic_ncols=True):
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        with torch.no_grad():
            model.set_submodule(name, rtn_linear(lin, c, name))
