"""Several LoRA adapters resident at once, chosen per call or per batch row (multi-LoRA serving).

The adapter ``apply_peft`` / ``load_adapter`` made is ``"default"``; more LoRA adapters live next to
it on the same wrapped linears (each a :class:`slimlm.peft.lora.layer.LoraPair`), under a name::

    apply_peft(lm.model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    load_adapter(lm.model, "adapters/sql", adapter_name="sql")   # a peft/slimlm LoRA folder
    add_adapter(lm.model, "chat", LoraConfig(r=4, target_modules=["q_proj"]))  # a fresh one to train
    set_adapter(lm.model, "sql")                                  # every call runs "sql"
    logits = forward_with_adapters(lm.model, ids, ["sql", "default", "__base__"])  # one per row
    logits = lm.model(ids, adapter_names=["sql", "default", "__base__"])  # the same, peft's keyword

A row runs exactly what that adapter alone gives (``"__base__"``: no adapter); a layer an adapter
does not target runs its base for that row. An added adapter's targets must be among the default
adapter's (the wrapped linears). Added adapters are plain LoRA (no DoRA / PiSSA / LoftQ); merging
folds the default adapter only, so choosing another adapter on a merged model is refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from slimlm.peft.base import adapter_modules
from slimlm.peft.lora.config import LoraConfig
from slimlm.peft.lora.layer import BASE, DEFAULT, LoraLinear, LoraPair
from slimlm.peft.lora.model import lora_from_peft_config, lora_to_peft_config
from slimlm.peft.targets import linear_paths, select_paths, to_hf_path, to_runtime_path
from slimlm.utils.errors import CheckpointError, ConfigError, SlimlmError


def _loras(model: nn.Module) -> dict[str, LoraLinear]:
    mods = {p: m for p, m in adapter_modules(model).items() if isinstance(m, LoraLinear)}
    if not mods:
        raise SlimlmError("several adapters need a LoRA adapter first (apply_peft or load_adapter)")
    return mods


def _named(model: nn.Module) -> dict[str, LoraConfig]:
    named = model.__dict__.get("peft_adapters")
    if named is None:
        named = model.__dict__["peft_adapters"] = {}
        if "_adapter_names_hook" not in model.__dict__:  # model(ids, adapter_names=[...]), as peft's forward
            model.__dict__["_adapter_names_hook"] = (
                model.register_forward_pre_hook(_take_names, with_kwargs=True),
                model.register_forward_hook(_drop_names, always_call=True))
    return named  # type: ignore[no-any-return]


def _take_names(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        ids = args[0] if args else kwargs["input_ids"]
        if len(names) != ids.shape[0]:
            raise ConfigError(f"adapter_names has {len(names)} entries for a batch of {ids.shape[0]} rows")
        for m in _check_choice(model, names).values():
            m.row_adapters = list(names)
    return args, kwargs


def _drop_names(model: nn.Module, args: tuple[Any, ...], out: Any) -> None:
    for m in adapter_modules(model).values():
        if isinstance(m, LoraLinear):
            m.row_adapters = None


def adapter_names(model: nn.Module) -> list[str]:
    """``["default", ...]``: the LoRA adapters resident on ``model``."""
    _loras(model)
    return [DEFAULT, *_named(model)]


def _new_name(model: nn.Module, name: str, cfg: Any) -> None:
    if not isinstance(name, str) or not name or name in (DEFAULT, BASE) or "." in name:
        raise ConfigError(f"adapter name {name!r} is not allowed (not 'default', '__base__', empty or dotted)")
    if name in _named(model):
        raise SlimlmError(f"an adapter named {name!r} is already resident: unload the model's adapters first")
    if not isinstance(cfg, LoraConfig) or cfg.use_dora or cfg.init_lora_weights in ("pissa", "loftq"):
        raise ConfigError("added adapters are plain LoRA (no DoRA, PiSSA or LoftQ)")


def add_adapter(model: nn.Module, name: str, cfg: LoraConfig) -> list[str]:
    """Add a fresh LoRA adapter ``name`` (trainable, init as ``cfg``); returns the paths it covers."""
    _new_name(model, name, cfg)
    mods = _loras(model)
    paths = select_paths(sorted(mods), cfg.target_modules)
    for p in paths:
        m = mods[p]
        if cfg.r > min(m.in_features, m.out_features):
            raise ConfigError(f"LoRA rank {cfg.r} is larger than the layer {p} ({m.out_features} x {m.in_features})")
    for p in paths:
        pair = mods[p].add_extra(name, cfg.r, cfg.scaling, cfg.lora_dropout)
        with torch.no_grad():
            if cfg.init_lora_weights == "gaussian":
                torch.nn.init.normal_(pair.lora_A.weight, std=1.0 / cfg.r)
            if cfg.init_lora_weights == "random":
                torch.nn.init.kaiming_uniform_(pair.lora_B.weight, a=5**0.5)
    _named(model)[name] = cfg
    return paths


def load_named(model: nn.Module, name: str, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> list[str]:
    """Load a LoRA adapter file as the resident adapter ``name`` (see :func:`slimlm.peft.load_adapter`)."""
    from slimlm.peft.adapter import module_parts
    from slimlm.peft.registry import method_for_peft_type

    method = method_for_peft_type(str(meta.get("peft_type")))
    if method.name != "lora":
        raise ConfigError(f"only LoRA adapters can be resident next to others, not {method.name}")
    cfg = lora_from_peft_config(meta)
    _new_name(model, name, cfg)
    mods = _loras(model)
    parts = module_parts(method, tensors)
    placed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for hf_path, ts in parts.items():
        path = to_runtime_path(model.config, hf_path)  # type: ignore[arg-type]
        if path not in mods:
            raise CheckpointError(f"adapter {name!r} targets {hf_path}, which the default adapter does not wrap")
        a, b = ts.get("lora_A.weight"), ts.get("lora_B.weight")
        m = mods[path]
        if a is None or b is None or a.shape[1] != m.in_features or b.shape != (m.out_features, a.shape[0]):
            raise CheckpointError(f"adapter {name!r} for {hf_path} does not fit the layer: is it an adapter for "
                                  "another base model?")
        placed[path] = (a, b)
    for path, (a, b) in placed.items():
        r = a.shape[0]
        pair = mods[path].add_extra(name, r, cfg.lora_alpha / (r**0.5 if cfg.use_rslora else r), cfg.lora_dropout)
        with torch.no_grad():
            pair.lora_A.weight.copy_(a)
            pair.lora_B.weight.copy_(b)
    _named(model)[name] = cfg
    return sorted(placed)


def named_tensors(model: nn.Module, name: str, prefix: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of the resident adapter ``name`` in peft's layout."""
    if name not in _named(model):
        raise SlimlmError(f"no adapter named {name!r}; resident: {adapter_names(model)}")
    cfg = model.config  # type: ignore[union-attr]
    by_hf: dict[str, Any] = {}
    tensors: dict[str, torch.Tensor] = {}
    for path, m in _loras(model).items():
        if m.extra is not None and name in m.extra:
            hf = to_hf_path(cfg, path)
            pair = m.extra[name]
            assert isinstance(pair, LoraPair)
            by_hf[hf] = pair
            tensors[f"{prefix}{hf}.lora_A.weight"] = pair.lora_A.weight.detach().contiguous().clone()
            tensors[f"{prefix}{hf}.lora_B.weight"] = pair.lora_B.weight.detach().contiguous().clone()
    all_hf = list(by_hf) + [to_hf_path(cfg, p) for p in _loras(model) if to_hf_path(cfg, p) not in by_hf]
    for n in linear_paths(model, LoraLinear):
        try:
            all_hf.append(to_hf_path(cfg, n))
        except SlimlmError:
            pass
    return lora_to_peft_config(_named(model)[name], by_hf, all_hf), tensors


def _check_choice(model: nn.Module, names: Sequence[str]) -> dict[str, LoraLinear]:
    mods = _loras(model)
    known = set(adapter_names(model)) | {BASE}
    unknown = sorted(set(names) - known)
    if unknown:
        raise ConfigError(f"unknown adapter {unknown[0]!r}; resident: {sorted(known)}")
    if any(m.merged for m in mods.values()):
        raise SlimlmError("the default adapter is merged into the base: unmerge it before choosing adapters")
    return mods


def set_adapter(model: nn.Module, name: str) -> None:
    """Make ``name`` (or ``"__base__"``) the adapter every following call runs."""
    for m in _check_choice(model, [name]).values():
        m.active = name


@contextmanager
def adapter_batch(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Within the block, row i of every batch runs adapter ``names[i]``."""
    mods = _check_choice(model, names)
    for m in mods.values():
        m.row_adapters = list(names)
    try:
        yield
    finally:
        for m in mods.values():
            m.row_adapters = None


def forward_with_adapters(model: nn.Module, input_ids: torch.Tensor, adapter_names: Sequence[str],
                          **kwargs: Any) -> torch.Tensor:
    """``model(input_ids, **kwargs)`` with row i under adapter ``adapter_names[i]`` (peft's ``adapter_names``)."""
    if len(adapter_names) != input_ids.shape[0]:
        raise ConfigError(f"adapter_names has {len(adapter_names)} entries for a batch of {input_ids.shape[0]} rows")
    with adapter_batch(model, adapter_names):
        return model(input_ids, **kwargs)  # type: ignore[no-any-return]
