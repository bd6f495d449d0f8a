"""The PEFT methods slimlm knows, registered once each by name and config type.

A method is a typed config (a dataclass with ``peft_type``, peft's name for it, and a ``version``),
a function that wraps the matching linears of a model in place, and the pieces the peft-format
saver/loader needs. This small local registry stands in until the one transform registry (quantize,
prune, factorize, fine-tune) lands: it only has to be re-pointed there, the methods stay as they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimlm.utils.errors import ConfigError


@dataclass
class PeftReport:
    """What applying a method did: every transform returns one of these."""

    method: str
    targets: list[str]  # runtime module paths wrapped
    trainable_params: int
    total_params: int

    def summary(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"{self.method}: {len(self.targets)} modules wrapped, {self.trainable_params:,} trainable of "
                f"{self.total_params:,} parameters ({pct:.3f}%)")


@dataclass(frozen=True)
class PeftMethod:
    name: str  # slimlm's name ("lora")
    peft_type: str  # peft's adapter_config.json "peft_type" ("LORA")
    config_cls: type
    apply: Callable[[nn.Module, Any], PeftReport]  # wrap the targets of a model in place
    from_peft_config: Callable[[dict[str, Any]], Any]  # adapter_config.json dict -> config
    # methods that wrap linears (LoRA, IA3):
    # (config, {HF path: wrapper} of the wrapped modules, HF paths of every linear) -> adapter_config.json
    to_peft_config: Callable[[Any, dict[str, Any], list[str]], dict[str, Any]] | None = None
    key_suffixes: tuple[str, ...] = ()  # peft's tensor key suffixes per module ("lora_A.weight", ...)
    # (base module, {suffix: tensor} of one module, config, runtime path) -> the loaded wrapper
    build: Callable[[nn.Module, dict[str, Any], Any, str], nn.Module] | None = None
    # methods that add a model-level module instead (prompt tuning): its tensors under peft's keys,
    # its adapter_config.json, loading them onto a model, and removing the module
    model_tensors: Callable[[nn.Module], dict[str, Any]] | None = None
    model_peft_config: Callable[[Any, nn.Module], dict[str, Any]] | None = None
    load_model_tensors: Callable[[nn.Module, dict[str, Any], Any], list[str]] | None = None
    remove: Callable[[nn.Module], bool] | None = None


_METHODS: dict[str, PeftMethod] = {}


def register_peft_method(method: PeftMethod) -> PeftMethod:
    if method.name in _METHODS and _METHODS[method.name] != method:
        raise ValueError(f"PEFT method {method.name!r} registered twice")
    _METHODS[method.name] = method
    return method


def peft_methods() -> dict[str, PeftMethod]:
    return dict(_METHODS)


def method_for_config(cfg: Any) -> PeftMethod:
    for m in _METHODS.values():
        if isinstance(cfg, m.config_cls):
            return m
    raise ConfigError(f"{type(cfg).__name__} is not the config of a PEFT method; known: {sorted(_METHODS)}")


def method_for_model(model: nn.Module) -> PeftMethod:
    cfg = getattr(model, "peft_config", None)
    if cfg is None:
        raise ConfigError("this model has no adapters (apply_peft or load_adapter first)")
    return method_for_config(cfg)


def method_for_peft_type(peft_type: str) -> PeftMethod:
    for m in _METHODS.values():
        if m.peft_type == peft_type:
            return m
    raise ConfigError(f"adapter peft_type {peft_type!r} is not supported; slimlm reads "
                      f"{sorted(m.peft_type for m in _METHODS.values())}")
