"""Optimizers by name: one registry the trainer builds from (``build_optimizer("adamw", groups, lr=1e-4)``).

Each optimizer is a ``torch.optim.Optimizer`` (its own file in this package, registered once with
:func:`register_optimizer`), so it works with torch's LR schedulers, ``state_dict``/``load_state_dict`` (for
bit-exact resume) and distributed wrappers. An optimizer that updates inside backward (LOMO-style) sets the
class attribute ``updates_in_backward = True`` and offers ``attach(model)``; the trainer then calls
``attach`` once, does not call ``zero_grad``/``clip_grad_norm_`` itself, and still calls ``step()`` (a no-op
or bookkeeping) once per optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from slimlm.utils.errors import ConfigError

OptimizerFactory = Callable[..., torch.optim.Optimizer]
_OPTIMIZERS: dict[str, OptimizerFactory] = {}


def register_optimizer(name: str) -> Callable[[OptimizerFactory], OptimizerFactory]:
    """Decorator: register ``factory(param_groups, **kwargs) -> Optimizer`` under ``name`` (once)."""

    def deco(factory: OptimizerFactory) -> OptimizerFactory:
        if name in _OPTIMIZERS:
            raise ConfigError(f"optimizer {name!r} is registered twice")
        _OPTIMIZERS[name] = factory
        return factory

    return deco


def optimizers() -> list[str]:
    return sorted(_OPTIMIZERS)


def build_optimizer(name: str, params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    """``params``: tensors or torch param-group dicts (e.g. LoRA+ gives B its own ``lr``)."""
    if name not in _OPTIMIZERS:
        raise ConfigError(f"unknown optimizer {name!r}; known: {', '.join(optimizers())}")
    return _OPTIMIZERS[name](params, **kwargs)


@register_optimizer("adamw")
def _adamw(params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    # torch's AdamW is the reference; foreach is its fastest CPU path for many small tensors
    return torch.optim.AdamW(params, **kwargs)


__all__ = ["build_optimizer", "optimizers", "register_optimizer"]

# each optimizer registers itself on import (after the registry above exists)
from slimlm.train.optim import adafactor, adamw8bit, came, galore, lion, lomo  # noqa: E402,F401
