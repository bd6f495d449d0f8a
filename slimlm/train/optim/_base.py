"""What every slimlm optimizer shares: argument checks with clear errors and a ``load_state_dict`` that
keeps each state tensor's saved dtype.

Why the override: ``torch.optim.Optimizer.load_state_dict`` casts every floating state tensor to its
parameter's dtype and leaves integer ones alone, but it also casts the fp32 scales of an 8-bit state
(or an fp32 moment of a bf16 parameter) down to bf16. A resumed run would then differ from the
uninterrupted one. Here every tensor comes back in the dtype it was saved in (moved to the parameter's
device), so ``state_dict`` → ``torch.save`` → ``torch.load`` → ``load_state_dict`` is exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch

from slimlm.utils.errors import ConfigError


class SlimOptimizer(torch.optim.Optimizer):
    """Base class: ``step`` runs the closure (with grad), then the subclass's ``_update`` (without);
    ``load_state_dict`` restores state dtypes exactly."""

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._update()
        return loss

    def _update(self) -> None:
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(saved_ids, params, strict=True):
            for key, value in state_dict["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor) and self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device)


def check_range(name: str, value: float, low: float, high: float, *, high_open: bool = True) -> None:
    """Raise ``ConfigError`` unless ``low <= value < high`` (``<= high`` when ``high_open`` is False)."""
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        bracket = ")" if high_open else "]"
        raise ConfigError(f"{name} must be in [{low}, {high}{bracket}, got {value}")


def check_common(lr: float, weight_decay: float, betas: Iterable[float] = ()) -> None:
    """The checks every optimizer here makes on its shared hyper-parameters."""
    if not lr >= 0.0:
        raise ConfigError(f"lr must be >= 0, got {lr}")
    if not weight_decay >= 0.0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    for i, b in enumerate(betas):
        check_range(f"betas[{i}]", b, 0.0, 1.0)
