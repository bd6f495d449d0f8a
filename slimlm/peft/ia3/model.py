"""Applying IA3 to a model, loading one module from an adapter file, and peft's adapter_config.json."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.peft.base import AdapterLayer, install
from slimlm.peft.ia3.config import IA3Config
from slimlm.peft.ia3.layer import IA3Linear
from slimlm.peft.registry import PeftReport
from slimlm.peft.targets import match_targets, peft_targets
from slimlm.utils.errors import CheckpointError, ConfigError


def apply_ia3(model: nn.Module, cfg: IA3Config) -> PeftReport:
    paths = match_targets(model, cfg.target_modules, AdapterLayer)
    ff = set(match_targets(model, cfg.feedforward_modules, AdapterLayer)) if cfg.feedforward_modules else set()
    if not ff <= set(paths):
        raise ConfigError(f"feedforward_modules must be among target_modules; not targeted: {sorted(ff - set(paths))[:3]}")
    install(model, {p: IA3Linear(model.get_submodule(p), p in ff, cfg.init_ia3_weights) for p in paths})
    return PeftReport.of("ia3", paths, model)


def build_ia3(base: nn.Module, t: dict[str, torch.Tensor], cfg: IA3Config, where: str) -> IA3Linear:
    """An :class:`IA3Linear` from one module's ``ia3_l``: ``[1, in]`` scales the input, ``[out, 1]`` the output."""
    if set(t) != {"ia3_l"}:
        raise CheckpointError(f"adapter for {where} has {sorted(t)}, expected ['ia3_l']")
    lv = t["ia3_l"]
    i, o = getattr(base, "in_features", -1), getattr(base, "out_features", -1)
    if lv.shape not in ((1, i), (o, 1)):
        raise CheckpointError(f"adapter for {where} has ia3_l {tuple(lv.shape)}; the layer takes [1, {i}] or [{o}, 1]: "
                              "is it an adapter for another base model?")
    w = IA3Linear(base, feedforward=lv.shape == (1, i) and (o, 1) != (1, i), dtype=lv.dtype)
    with torch.no_grad():
        w.ia3_l.copy_(lv)
    return w


def ia3_to_peft_config(cfg: IA3Config, wrapped: dict[str, Any], all_hf_linears: list[str]) -> dict[str, Any]:
    hf_paths = list(wrapped)
    ff = [p for p, m in wrapped.items() if m.is_feedforward]
    return {"peft_type": "IA3", "task_type": "CAUSAL_LM", "target_modules": peft_targets(hf_paths, all_hf_linears),
            "feedforward_modules": peft_targets(ff, hf_paths) if ff else [], "fan_in_fan_out": False,
            "init_ia3_weights": cfg.init_ia3_weights, "modules_to_save": None, "inference_mode": True}


def ia3_from_peft_config(d: dict[str, Any]) -> IA3Config:
    if d.get("modules_to_save") not in (None, []):
        raise ConfigError(f"adapter_config.json: modules_to_save={d['modules_to_save']!r} is not supported by slimlm's IA3")
    if not d.get("target_modules"):
        raise ConfigError("adapter_config.json lacks target_modules")
    return IA3Config(target_modules=d["target_modules"], feedforward_modules=d.get("feedforward_modules") or [],
                     init_ia3_weights=bool(d.get("init_ia3_weights", True)))
