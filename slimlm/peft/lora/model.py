"""Applying LoRA to a model, and its adapter_config.json in peft's vocabulary."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.peft.base import AdapterLayer, install
from slimlm.peft.lora.config import LoraConfig
from slimlm.peft.lora.layer import LoraLinear
from slimlm.peft.registry import PeftReport
from slimlm.peft.targets import match_targets, peft_targets
from slimlm.utils.errors import CheckpointError, ConfigError

_PEFT_INIT = {"kaiming": True, "gaussian": "gaussian", "random": False}


def apply_lora(model: nn.Module, cfg: LoraConfig) -> PeftReport:
    """Wrap every linear ``cfg.target_modules`` matches in a :class:`LoraLinear`; freeze the rest."""
    paths = match_targets(model, cfg.target_modules, AdapterLayer)
    wrapped = {p: LoraLinear(model.get_submodule(p), cfg.r, cfg.scaling, cfg.lora_dropout, cfg.init_lora_weights,
                             use_dora=cfg.use_dora)
               for p in paths}  # build all first: a rank error leaves the model untouched
    install(model, wrapped)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return PeftReport("lora", paths, trainable, total)


def lora_to_peft_config(cfg: LoraConfig, wrapped: dict[str, Any], all_hf_linears: list[str]) -> dict[str, Any]:
    """adapter_config.json for peft: ``target_modules`` as leaf names when those select exactly the
    wrapped modules in the HF model, else a regex of the exact HF paths."""
    targets = peft_targets(list(wrapped), all_hf_linears)
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout, "target_modules": targets, "bias": "none", "use_rslora": cfg.use_rslora,
        "use_dora": cfg.use_dora, "init_lora_weights": _PEFT_INIT[cfg.init_lora_weights], "fan_in_fan_out": False,
        "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "layers_pattern": None, "inference_mode": True,
    }


def lora_from_peft_config(d: dict[str, Any]) -> LoraConfig:
    """The parts of a peft LoRA adapter_config.json slimlm runs; anything else is refused by name."""
    for key, ok in (("bias", "none"), ("modules_to_save", None), ("alpha_pattern", {}),
                    ("layers_to_transform", None), ("use_qalora", False)):
        v = d.get(key, ok)
        if v != ok and not (ok is None and v == []):
            raise ConfigError(f"adapter_config.json: {key}={v!r} is not supported by slimlm's LoRA (needs {ok!r})")
    init = d.get("init_lora_weights", True)
    init_name = "gaussian" if init == "gaussian" else "random" if init is False else "kaiming"
    if not d.get("target_modules") or "r" not in d:
        raise ConfigError("adapter_config.json lacks target_modules or r")
    return LoraConfig(r=int(d["r"]), lora_alpha=float(d.get("lora_alpha", 8)), target_modules=d["target_modules"],
                      lora_dropout=float(d.get("lora_dropout", 0.0)), init_lora_weights=init_name,
                      use_rslora=bool(d.get("use_rslora", False)), use_dora=bool(d.get("use_dora", False)))


def build_lora(base: nn.Module, t: dict[str, torch.Tensor], cfg: LoraConfig, where: str) -> LoraLinear:
    """A :class:`LoraLinear` holding one module's tensors from an adapter file (shapes checked)."""
    need = {"lora_A.weight", "lora_B.weight"} | ({"lora_magnitude_vector"} if cfg.use_dora else set())
    if set(t) != need:
        raise CheckpointError(f"adapter for {where} has {sorted(t)}, expected {sorted(need)}")
    a, b = t["lora_A.weight"], t["lora_B.weight"]
    r = a.shape[0]
    if a.shape != (r, getattr(base, "in_features", -1)) or b.shape != (getattr(base, "out_features", -1), r):
        raise CheckpointError(f"adapter for {where} has A {tuple(a.shape)} / B {tuple(b.shape)}, which do not fit "
                              "the model's layer: is it an adapter for another base model?")
    scaling = cfg.lora_alpha / (r**0.5 if cfg.use_rslora else r)  # per module: rank_pattern may vary r
    w = LoraLinear(base, r, scaling, cfg.lora_dropout, "kaiming", dtype=a.dtype if a.is_floating_point() else torch.float32,
                   use_dora=cfg.use_dora)
    with torch.no_grad():
        w.lora_A.weight.copy_(a)
        w.lora_B.weight.copy_(b)
        if cfg.use_dora:
            mag = t["lora_magnitude_vector"]
            if mag.shape != (w.out_features,):
                raise CheckpointError(f"adapter for {where} has a magnitude of shape {tuple(mag.shape)}, the layer "
                                      f"has {w.out_features} rows")
            w.lora_magnitude_vector.copy_(mag)
    return w


def lora_plus_param_groups(model: nn.Module, lr: float, lr_ratio: float = 16.0,
                           weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """LoRA+: optimizer parameter groups with ``lora_B`` at ``lr * lr_ratio`` and every other trainable
    tensor (``lora_A``, DoRA magnitudes, other adapters) at ``lr``. Pass to any torch optimizer::

        opt = torch.optim.AdamW(lora_plus_param_groups(lm.model, lr=2e-4, lr_ratio=16))
    """
    if lr_ratio <= 0:
        raise ConfigError(f"lr_ratio must be positive, got {lr_ratio}")
    b: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (b if name.endswith("lora_B.weight") else rest).append(p)
    if not b:
        raise ConfigError("LoRA+ needs trainable LoRA adapters (apply_peft with a LoraConfig first)")
    return [{"params": rest, "lr": lr, "weight_decay": weight_decay},
            {"params": b, "lr": lr * lr_ratio, "weight_decay": weight_decay}]
