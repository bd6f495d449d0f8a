"""NF4 weight-only quantization (QLoRA), no calibration: every selected linear becomes an NF4Linear.

The math (block-wise absmax, 16 NormalFloat levels, double quantization of the absmax) lives in
:mod:`slimlm.quant.nf4`; this file is the config and the module swap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.quant.config import QuantConfigBase
from slimlm.quant.methods.base import _bias, register_method, runtime_class
from slimlm.quant.nf4 import quantize_nf4
from slimlm.utils.errors import ConfigError


@dataclass
class NF4Config(QuantConfigBase):
    kind = "nf4"
    block_size: int = field(default=64, metadata={"min": 1, "help": "values per absmax block"})
    double_quant: bool = field(default=True, metadata={"help": "quantize the absmax values to int8 (QLoRA)"})

    def validate(self) -> None:
        if self.block_size <= 0:
            raise ConfigError(f"nf4: block_size must be positive, got {self.block_size}")
        super().validate()


def nf4_module(linear: nn.Linear, cfg: NF4Config, path: str = "") -> nn.Module:
    if linear.weight.numel() % cfg.block_size != 0:
        raise ConfigError(f"nf4: block_size {cfg.block_size} does not divide the weight size of {path or 'a linear'}")
    nw = quantize_nf4(linear.weight, cfg.block_size, cfg.double_quant)
    return runtime_class("NF4Linear").from_quantized(nw, bias=_bias(linear))  # type: ignore[no-any-return]


@register_method(NF4Config, calibrated=False)
def _apply_nf4(model: nn.Module, cfg: NF4Config, samples: Sequence[torch.Tensor] | None, progress: bool) -> None:
    todo = []
    for name, m in model.named_modules():
        c = cfg.for_module(name) if type(m) is nn.Linear else None
        if c is not None:
            if m.weight.numel() % c.block_size != 0:
                raise ConfigError(f"nf4: block_size {c.block_size} does not divide the weight size of {name}")
            todo.append((name, c))
    for name, c in tqdm(todo, desc="nf4: linears", unit="linear", disable=not progress, dynamic_ncols=True):
        lin = model.get_submodule(name)
        assert isinstance(lin, nn.Linear)
        with torch.no_grad():
            model.set_submodule(name, nf4_module(lin, c, name))
