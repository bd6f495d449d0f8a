"""The distillation objective as the trainer's loss hook (``Trainer(..., loss_fn=DistillLoss(...))``).

Per micro-batch the one trainer loop (``slimlm.train.loop``) runs the student and calls this with the
batch and the student's logits ``[B, T, V]``; it runs the frozen teacher on the same batch (no grad,
same packing / masks, the trainer's autocast dtype), takes the counted target positions (where
``labels[:, 1:]`` is not ignored: N of them) and returns the summed objective of ``slimlm.distill.losses``::

    (1 - alpha) * sum CE + alpha * sum T^2 KL_T(student, teacher) + hidden_weight * sum H(proj(h_s), h_t)

``h_s`` / ``h_t`` are the last decoder layer's outputs (the input of each model's final norm), read
by a forward pre-hook on that norm; ``proj`` is a learned ``Linear(d_student, d_teacher)`` (a
parameter of this module, so the trainer optimizes it) only when the widths differ.

Example::

    loss = DistillLoss(teacher.model, student.model, DistillConfig(alpha=0.9, temperature=2.0))
    Trainer(student.model, TrainConfig(max_steps=100), examples, loss_fn=loss).train()
    loss.close()
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.distill.config import DistillConfig
from slimlm.distill.losses import hidden_per_token, kd_per_token, mix
from slimlm.train.data import IGNORE
from slimlm.train.loop import autocast, forward_logits, loss_sum
from slimlm.utils.errors import SlimlmError


class DistillLoss(nn.Module):
    """KD (+ hidden-state alignment) mixed with the hard-label CE; see module docstring."""

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: DistillConfig,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        tc: Any = teacher.config  # ModelConfigs
        sc: Any = student.config
        if tc.vocab_size != sc.vocab_size:
            raise SlimlmError(f"student vocabulary ({sc.vocab_size}) differs from the teacher's ({tc.vocab_size})")
        self._teacher = [teacher]  # a list, not a submodule: its weights are neither trained nor checkpointed
        teacher.eval()
        teacher.requires_grad_(False)
        self.cfg, self.dtype = cfg, dtype
        self.proj = (nn.Linear(sc.hidden_size, tc.hidden_size, bias=False)
                     if cfg.uses_hidden and sc.hidden_size != tc.hidden_size else None)
        self._h: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []
        if cfg.uses_hidden:
            for name, m in (("student", student), ("teacher", teacher)):
                self._handles.append(m.model.norm.register_forward_pre_hook(self._grab(name)))  # type: ignore[union-attr]

    def _grab(self, name: str) -> Any:
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            self._h[name] = args[0]  # [B, T, D] the last decoder layer's output
        return hook

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    def close(self) -> None:
        """Remove the hidden-state hooks from both models."""
        for h in self._handles:
            h.remove()
        self._handles, self._h = [], {}

    def forward(self, model: nn.Module, batch: dict[str, torch.Tensor], logits: torch.Tensor) -> torch.Tensor:
        # logits: [B, T, V] of the student; the summed objective over the counted targets
        labels = batch["labels"]
        with torch.no_grad(), autocast(self.dtype):
            t_logits = forward_logits(self.teacher, batch)  # [B, T, V]
        mask = labels[:, 1:] != IGNORE  # [B, T-1]: position t predicts token t+1
        cfg = self.cfg
        ce = loss_sum(logits, labels)
        kd = kd_per_token(logits[:, :-1][mask], t_logits[:, :-1][mask], cfg.temperature, cfg.kd_loss).sum()
        hidden = None
        if cfg.uses_hidden:
            hs, ht = self._h.pop("student"), self._h.pop("teacher")
            hs = hs[:, -logits.shape[1]:][:, :-1][mask]  # [N, Ds]
            ht = ht[:, -t_logits.shape[1]:][:, :-1][mask]  # [N, Dt]
            if self.proj is not None:
                hs = self.proj(hs.float())
            hidden = hidden_per_token(hs, ht, cfg.hidden_loss).sum()
        return mix(ce, kd, cfg.alpha, hidden, cfg.hidden_weight)


__all__ = ["DistillLoss"]
