"""One registry of every model transform: name -> config class, family, entry point, calibration rule.

Each transform registers once, where its config is defined::

    register_transform(PruneConfig, apply=prune_, calibrated=lambda c: c.method != "magnitude")

``apply(model, config, samples, progress) -> TransformReport`` is the transform's one entry point;
:func:`apply_transform` dispatches any registered config to it. Quantization methods register
through :func:`slimlm.quant.methods.base.register_method` (their entry point is ``quantize_``, which
chains methods). A second registration of a name raises instead of replacing the first; the config
class is also registered with :func:`slimlm.utils.config.register_config`, so recipes load it by kind.
A new family (e.g. PEFT adapters) needs nothing here: give its configs a ``family`` and register them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from slimlm.transforms.config import TransformConfig
from slimlm.transforms.report import TransformReport
from slimlm.utils.config import config_kinds, register_config
from slimlm.utils.errors import ConfigError

Apply = Callable[..., TransformReport]  # (model, config, samples | None, progress) -> report

# packages whose import registers the built-in transforms (looked up lazily: no import cycles)
BUILTIN_PACKAGES = ("slimlm.quant.methods", "slimlm.sparsity", "slimlm.sparsity.structured", "slimlm.lowrank",
                    "slimlm.peft")


@dataclass(frozen=True)
class TransformEntry:
    name: str
    family: str
    config_cls: type[TransformConfig]
    apply: Apply
    calibrated: Callable[[Any], bool]

    def needs_calibration(self, config: Any) -> bool:
        return bool(self.calibrated(config))


_REGISTRY: dict[str, TransformEntry] = {}


def register_transform(config_cls: type[TransformConfig], apply: Apply,
                       calibrated: bool | Callable[[Any], bool] = False) -> TransformEntry:
    """Register ``config_cls`` (its ``kind`` is the name) with its entry point; a duplicate name raises."""
    name, family = config_cls.kind, config_cls.family
    if not name or not family:
        raise ValueError(f"{config_cls.__name__} needs a kind and a family to be registered")
    if name in _REGISTRY:
        raise ValueError(f"transform {name!r} is already registered (by {_REGISTRY[name].config_cls.__name__})")
    known = config_kinds().get(name)
    if known is not None and known is not config_cls:
        raise ValueError(f"config kind {name!r} is already taken by {known.__name__}")
    rule = calibrated if callable(calibrated) else (lambda _c, v=bool(calibrated): v)
    entry = TransformEntry(name, family, config_cls, apply, rule)
    _REGISTRY[name] = entry
    if known is None:
        register_config(config_cls)
    return entry


def load_builtin() -> None:
    for mod in BUILTIN_PACKAGES:
        importlib.import_module(mod)


def transforms(family: str | None = None) -> dict[str, TransformEntry]:
    """Registered transforms by name (all, or one family's); the built-in ones are imported first."""
    load_builtin()
    return {k: e for k, e in sorted(_REGISTRY.items()) if family is None or e.family == family}


def get_transform(config: Any) -> TransformEntry:
    """The entry of a config instance (looked up by its kind and checked against its class)."""
    entries = transforms()
    kind = getattr(config, "kind", None)
    entry = entries.get(kind) if isinstance(kind, str) else None
    if entry is None or not isinstance(config, entry.config_cls):
        raise ConfigError(f"not a registered transform config: {config!r}; known: {', '.join(entries)}")
    return entry


def apply_transform(model: nn.Module, config: Any, samples: Sequence[torch.Tensor] | None = None,
                    progress: bool = False) -> TransformReport:
    """Run any registered transform on ``model`` in place; returns its report."""
    entry = get_transform(config)
    if entry.needs_calibration(config) and not samples:
        raise ConfigError(f"{entry.name} needs calibration samples (pass samples / --calib)")
    return entry.apply(model, config, samples, progress)
