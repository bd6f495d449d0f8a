"""The PEFT methods slimlm knows, registered once each in the one transform registry.

A method is a typed config (a :class:`slimlm.transforms.TransformConfig` with ``family = "peft"``
and its ``kind`` as the name), a function that wraps the matching linears of a model in place, and
the pieces the peft-format saver/loader needs (:class:`PeftMethod`). :func:`register_peft_method`
registers the config with :func:`slimlm.transforms.register_transform` too, so any PEFT config runs
through the one entry point and returns the one report type::

    from slimlm.transforms import apply_transform
    report = apply_transform(lm.model, LoraConfig(r=16, target_modules=["q_proj", "v_proj"]))
    report.metrics["trainable_params"], sorted(report.modules)  # the wrapped runtime paths

A second registration of a name (or of a peft_type) raises instead of replacing the first.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from slimlm.transforms import TransformConfig, TransformReport, register_transform
from slimlm.utils.errors import ConfigError, SlimlmError


class PeftReport(TransformReport):
    """What applying a method did: a :class:`TransformReport` whose ``modules`` are the wrapped (or
    added) runtime paths and whose ``metrics`` hold ``trainable_params`` / ``total_params``."""

    @classmethod
    def of(cls, method: str, targets: list[str], model: nn.Module, seconds: float = 0.0) -> PeftReport:
        """``total_params`` counts a compressed linear (codes in buffers) by its logical ``out x in``."""
        from slimlm.peft.base import AdapterLayer

        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        for m in model.modules():
            if (not isinstance(m, AdapterLayer) and "weight" not in m._parameters
                    and isinstance(getattr(m, "in_features", None), int)
                    and isinstance(getattr(m, "out_features", None), int)):
                total += int(m.in_features) * int(m.out_features)  # type: ignore[arg-type]
        return cls(method=method, seconds=seconds, modules={t: {} for t in targets},
                   metrics={"trainable_params": trainable, "total_params": total})

    @property
    def targets(self) -> list[str]:
        return list(self.modules)

    @property
    def trainable_params(self) -> int:
        return int(self.metrics["trainable_params"])

    @property
    def total_params(self) -> int:
        return int(self.metrics["total_params"])

    def summary(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        return (f"{self.method}: {len(self.targets)} modules wrapped, {self.trainable_params:,} trainable of "
                f"{self.total_params:,} parameters ({pct:.3f}%)")


@dataclass(frozen=True)
class PeftMethod:
    name: str  # slimlm's name ("lora") = the config's kind
    peft_type: str  # peft's adapter_config.json "peft_type" ("LORA"; slimlm's own for methods peft lacks)
    config_cls: type[TransformConfig]
    apply: Callable[[nn.Module, Any], PeftReport]  # wrap the targets of a model in place
    from_peft_config: Callable[[dict[str, Any]], Any]  # adapter_config.json dict -> config
    # methods that wrap linears (LoRA, IA3, bottleneck):
    # (config, {HF path: wrapper} of the wrapped modules, HF paths of every linear) -> adapter_config.json
    to_peft_config: Callable[[Any, dict[str, Any], list[str]], dict[str, Any]] | None = None
    key_suffixes: tuple[str, ...] = ()  # peft's tensor key suffixes per module ("lora_A.weight", ...)
    # (base module, {suffix: tensor} of one module, config, runtime path) -> the loaded wrapper
    build: Callable[[nn.Module, dict[str, Any], Any, str], nn.Module] | None = None
    # methods that add a model-level module instead (prompt/prefix tuning, P-tuning): its tensors under
    # peft's keys, its adapter_config.json, loading them onto a model, and removing the module
    model_tensors: Callable[[nn.Module], dict[str, Any]] | None = None
    model_peft_config: Callable[[Any, nn.Module], dict[str, Any]] | None = None
    load_model_tensors: Callable[[nn.Module, dict[str, Any], Any], list[str]] | None = None
    remove: Callable[[nn.Module], bool] | None = None
    additive: bool = True  # the update folds into the base weights (merge / merge_and_unload)


_METHODS: dict[str, PeftMethod] = {}


def apply_peft(model: nn.Module, cfg: Any) -> PeftReport:
    """Apply the PEFT method whose config ``cfg`` is to ``model`` in place (base frozen). One method
    per model (more LoRA adapters: :func:`slimlm.peft.add_adapter`)."""
    t0 = time.perf_counter()
    method = method_for_config(cfg)
    have = getattr(model, "peft_config", None)
    if have is not None:
        raise SlimlmError(f"this model already carries {have.kind} adapters: unload them first "
                          "(several LoRA adapters: slimlm.peft.add_adapter / load_adapter(adapter_name=...))")
    report = method.apply(model, cfg)
    model.peft_config = cfg  # type: ignore[assignment]
    report.seconds = time.perf_counter() - t0
    return report


def _transform_entry(model: nn.Module, cfg: Any, samples: Any = None, progress: bool = False) -> TransformReport:
    return apply_peft(model, cfg)


def register_peft_method(method: PeftMethod) -> PeftMethod:
    """Register ``method`` here and its config in the transform registry; a duplicate raises."""
    if method.name in _METHODS:
        raise ValueError(f"PEFT method {method.name!r} is already registered")
    if any(m.peft_type == method.peft_type for m in _METHODS.values()):
        raise ValueError(f"peft_type {method.peft_type!r} is already registered")
    if method.config_cls.kind != method.name or method.config_cls.family != "peft":
        raise ValueError(f"{method.config_cls.__name__} needs kind={method.name!r} and family='peft'")
    register_transform(method.config_cls, apply=_transform_entry)
    _METHODS[method.name] = method
    return method


def peft_methods() -> dict[str, PeftMethod]:
    return dict(_METHODS)


def method_for_config(cfg: Any) -> PeftMethod:
    for m in _METHODS.values():
        if type(cfg) is m.config_cls:
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
