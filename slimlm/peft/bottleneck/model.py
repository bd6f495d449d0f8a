"""Applying Houlsby adapters, and slimlm's own adapter folder for them.

The folder has peft's layout (``adapter_config.json`` + ``adapter_model.safetensors``, keys
``base_model.model.<HF module path>.adapter_down.weight`` / ``.bias`` and ``adapter_up.*``), with
``"peft_type": "SLIMLM_HOULSBY"``: peft has no bottleneck adapter, so only slimlm reads it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.peft.base import AdapterLayer, install
from slimlm.peft.bottleneck.config import HoulsbyConfig
from slimlm.peft.bottleneck.layer import HoulsbyLinear
from slimlm.peft.registry import PeftReport
from slimlm.peft.targets import match_targets, peft_targets
from slimlm.utils.errors import CheckpointError, ConfigError

SUFFIXES = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")


def apply_houlsby(model: nn.Module, cfg: HoulsbyConfig) -> PeftReport:
    paths = match_targets(model, cfg.target_modules, AdapterLayer)
    wrapped = {p: HoulsbyLinear(model.get_submodule(p), cfg.bottleneck_size, cfg.non_linearity, cfg.adapter_dropout)
               for p in paths}
    install(model, wrapped)
    return PeftReport.of("houlsby", paths, model)


def build_houlsby(base: nn.Module, t: dict[str, torch.Tensor], cfg: HoulsbyConfig, where: str) -> HoulsbyLinear:
    if set(t) != set(SUFFIXES):
        raise CheckpointError(f"adapter for {where} has {sorted(t)}, expected {sorted(SUFFIXES)}")
    down = t["adapter_down.weight"]
    out = getattr(base, "out_features", -1)
    if down.shape != (cfg.bottleneck_size, out) or t["adapter_up.weight"].shape != (out, cfg.bottleneck_size):
        raise CheckpointError(f"adapter for {where} has down {tuple(down.shape)}, which does not fit the layer "
                              f"(out {out}, bottleneck {cfg.bottleneck_size}): is it an adapter for another base model?")
    w = HoulsbyLinear(base, cfg.bottleneck_size, cfg.non_linearity, cfg.adapter_dropout, dtype=down.dtype)
    with torch.no_grad():
        for name, p in w.named_parameters():
            if not name.startswith("base_layer."):
                p.copy_(t[name])
    return w


def houlsby_to_peft_config(cfg: HoulsbyConfig, wrapped: dict[str, Any], all_hf_linears: list[str]) -> dict[str, Any]:
    return {"peft_type": "SLIMLM_HOULSBY", "task_type": "CAUSAL_LM", "format": "slimlm bottleneck adapter v1",
            "target_modules": peft_targets(list(wrapped), all_hf_linears), "bottleneck_size": cfg.bottleneck_size,
            "non_linearity": cfg.non_linearity, "adapter_dropout": cfg.adapter_dropout, "inference_mode": True}


def houlsby_from_peft_config(d: dict[str, Any]) -> HoulsbyConfig:
    if not d.get("target_modules") or "bottleneck_size" not in d:
        raise ConfigError("adapter_config.json lacks target_modules or bottleneck_size")
    return HoulsbyConfig(target_modules=d["target_modules"], bottleneck_size=int(d["bottleneck_size"]),
                         non_linearity=str(d.get("non_linearity", "relu")),
                         adapter_dropout=float(d.get("adapter_dropout", 0.0)))
