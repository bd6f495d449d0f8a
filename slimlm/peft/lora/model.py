"""Applying LoRA to a model, and its adapter_config.json in peft's vocabulary."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.peft.base import AdapterLayer, install
from slimlm.peft.lora.config import LoraConfig
from slimlm.peft.lora.init import loftq_quantizer
from slimlm.peft.lora.layer import LoraLinear
from slimlm.peft.registry import PeftReport
from slimlm.peft.targets import match_targets, peft_targets
from slimlm.utils.errors import CheckpointError, ConfigError

_PEFT_INIT: dict[str, Any] = {"kaiming": True, "gaussian": "gaussian", "random": False, "pissa": "pissa",
                              "loftq": "loftq"}


def apply_lora(model: nn.Module, cfg: LoraConfig) -> PeftReport:
    """Wrap every linear ``cfg.target_modules`` matches in a :class:`LoraLinear`; freeze the rest."""
    paths = match_targets(model, cfg.target_modules, AdapterLayer)
    wrapped = {p: LoraLinear(model.get_submodule(p), cfg.r, cfg.scaling, cfg.lora_dropout, cfg.init_lora_weights,
                             use_dora=cfg.use_dora)
               for p in paths}  # build all first: a rank error leaves the model untouched
    if cfg.init_lora_weights in ("pissa", "loftq"):
        for p, w in wrapped.items():
            if type(w.base_layer) is not nn.Linear:
                raise ConfigError(f"init_lora_weights={cfg.init_lora_weights!r} needs plain float linears; {p} is a "
                                  f"{type(w.base_layer).__name__} (LoftQ quantizes the float base itself)")
        for w in wrapped.values():
            _init_from_base(w, cfg)
    install(model, wrapped)
    return PeftReport.of("lora", paths, model)


def _init_from_base(w: LoraLinear, cfg: LoraConfig) -> None:
    quantize = loftq_quantizer(cfg.loftq_quantizer, cfg.loftq_group_size) if cfg.init_lora_weights == "loftq" else None
    w.init_from_base(cfg.init_lora_weights, quantize, cfg.loftq_iter)


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
        **({"loftq_config": {"loftq_bits": 4, "loftq_iter": cfg.loftq_iter, "slimlm_quantizer": cfg.loftq_quantizer,
                             "slimlm_group_size": cfg.loftq_group_size}}
           if cfg.init_lora_weights == "loftq" else {}),
    }


def pissa_as_lora(meta: dict[str, Any], tensors: dict[str, torch.Tensor], mods: dict[str, LoraLinear],
                  prefix: str) -> None:
    """Rewrite a PiSSA adapter (``meta``, ``tensors`` keyed ``prefix + HF path``) in place into a plain
    LoRA of rank 2r for the *original* base: ``W + s (B A - B0 A0) = W_res + s B A`` with
    ``A' = [A; A0]``, ``B' = [B, -B0]`` and the scaling kept (alpha doubled; x sqrt 2 with rsLoRA), as
    peft's ``save_pretrained(path_initial_model_for_weight_conversion=...)`` writes it."""
    if meta.get("init_lora_weights") != "pissa":
        raise ConfigError("convert_pissa_to_lora needs a PiSSA adapter (init_lora_weights='pissa')")
    for hf, m in mods.items():
        assert m._init_ab is not None, hf
        a0, b0 = m._init_ab
        key = f"{prefix}{hf}."
        tensors[key + "lora_A.weight"] = torch.cat([m.lora_A.weight.detach(), a0.to(m.lora_A.weight.dtype)], 0)
        tensors[key + "lora_B.weight"] = torch.cat([m.lora_B.weight.detach(), -b0.to(m.lora_B.weight.dtype)], 1)
    meta["r"] *= 2
    meta["lora_alpha"] *= 2**0.5 if meta["use_rslora"] else 2
    meta["init_lora_weights"] = True


def lora_from_peft_config(d: dict[str, Any]) -> LoraConfig:
    """The parts of a peft LoRA adapter_config.json slimlm runs; anything else is refused by name."""
    for key, ok in (("bias", "none"), ("modules_to_save", None), ("alpha_pattern", {}),
                    ("layers_to_transform", None), ("use_qalora", False)):
        v = d.get(key, ok)
        if v != ok and not (ok is None and v == []):
            raise ConfigError(f"adapter_config.json: {key}={v!r} is not supported by slimlm's LoRA (needs {ok!r})")
    init = d.get("init_lora_weights", True)
    named = {v: k for k, v in _PEFT_INIT.items() if isinstance(v, str)}
    if isinstance(init, str) and init not in named:
        raise ConfigError(f"adapter_config.json: init_lora_weights={init!r} is not supported by slimlm "
                          f"(reads true, false, {', '.join(named)})")
    init_name = named[init] if isinstance(init, str) else "random" if init is False else "kaiming"
    loftq = d.get("loftq_config") or {}
    if init_name == "loftq" and int(loftq.get("loftq_bits", 4)) != 4:
        raise ConfigError(f"adapter_config.json: LoftQ with {loftq.get('loftq_bits')} bits is not supported (4 only)")
    if not d.get("target_modules") or "r" not in d:
        raise ConfigError("adapter_config.json lacks target_modules or r")
    return LoraConfig(r=int(d["r"]), lora_alpha=float(d.get("lora_alpha", 8)), target_modules=d["target_modules"],
                      lora_dropout=float(d.get("lora_dropout", 0.0)), init_lora_weights=init_name,
                      use_rslora=bool(d.get("use_rslora", False)), use_dora=bool(d.get("use_dora", False)),
                      loftq_iter=int(loftq.get("loftq_iter", 1)), loftq_quantizer=str(loftq.get("slimlm_quantizer", "nf4")),
                      loftq_group_size=int(loftq.get("slimlm_group_size", 64)))


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
    if cfg.init_lora_weights in ("pissa", "loftq"):  # rebuild the base the adapter was trained on (as peft)
        _init_from_base(w, cfg)
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
