"""LOMO (Lv et al. 2023, "Full Parameter Fine-tuning for Large Language Models with Limited Resources"):
SGD fused into backward. Each parameter is updated the moment its gradient is complete
(``Tensor.register_post_accumulate_grad_hook``) and its gradient is freed right away, so neither
optimizer state nor a full set of gradients is ever resident: memory = weights + activations.

Update per parameter, inside backward: ``p = p - lr * (g + weight_decay * p)`` (plain SGD, the paper's).

How the trainer drives it (``updates_in_backward = True``): build it, call ``attach(model)`` once, then
per step ``loss.backward()`` (updates happen here) and ``step()`` (bookkeeping only: counts the step
and checks that every parameter was updated at most once since the last one). It cannot honour what
needs all gradients before any update, so it refuses them with a ``ConfigError``:
gradient accumulation > 1 (the paper's method has none) and gradient clipping by global norm
(LOMO's two-pass clipping is not implemented). A second backward before ``step()`` raises too.
``opt = build_optimizer("lomo", model.parameters(), lr=1e-3); opt.attach(model)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from slimlm.train.optim import register_optimizer
from slimlm.train.optim._base import SlimOptimizer, check_common
from slimlm.utils.errors import ConfigError, SlimlmError


class LOMO(SlimOptimizer):
    updates_in_backward = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0,
                 grad_accumulation: int = 1, max_grad_norm: float | None = None) -> None:
        check_common(lr, weight_decay)
        if grad_accumulation != 1:
            raise ConfigError(f"lomo updates inside backward and cannot accumulate gradients "
                              f"(grad_accumulation={grad_accumulation}); use 1 or another optimizer")
        if max_grad_norm:
            raise ConfigError(f"lomo cannot clip by global gradient norm (max_grad_norm={max_grad_norm}): "
                              "each parameter is updated before the others' gradients exist")
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self._handles: list[Any] = []
        self._updated: set[int] = set()  # ids of parameters updated since the last step()
        self.steps = 0

    def attach(self, model: torch.nn.Module) -> None:
        """Register the fused update on every trainable parameter of this optimizer (once)."""
        if self._handles:
            raise ConfigError("lomo is already attached to a model")
        in_model = {id(p) for p in model.parameters()}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in in_model:
                    raise ConfigError(f"lomo: a parameter of shape {tuple(p.shape)} is not in the attached model")
                if p.requires_grad:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(group)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, group: dict[str, Any]) -> Callable[[torch.Tensor], None]:
        def update(p: torch.Tensor) -> None:
            if id(p) in self._updated:
                raise SlimlmError("lomo: a parameter got a second gradient before step(); gradient "
                                  "accumulation (several backward passes per step) is not possible with lomo")
            self._updated.add(id(p))
            with torch.no_grad():
                g = p.grad
                if g is None:
                    return
                if group["weight_decay"] != 0.0:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(g, alpha=-group["lr"])
            p.grad = None  # freed: the next parameter's gradient reuses the memory

        return update

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None  # gradients are freed inside backward already

    def _update(self) -> None:
        if not self._handles:
            raise ConfigError("lomo: call attach(model) before training; it updates inside backward")
        self._updated.clear()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["lomo_steps"] = self.steps
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        self.steps = int(sd.pop("lomo_steps", 0))
        super().load_state_dict(sd)


register_optimizer("lomo")(LOMO)
