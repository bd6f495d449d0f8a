"""Distillation losses as pure functions of logits / hidden states (no model, no loop).

Shapes: ``s``, ``t`` are student / teacher logits ``[N, V]`` over the N counted target positions;
hidden states ``[N, D]``. Every function returns per-position losses ``[N]``; the objective sums
them (the trainer divides by the step's target tokens, like its cross-entropy).

- :func:`kd_per_token`: ``T^2 * KL`` of the temperature-``T`` softmaxes (Hinton et al.: the ``T^2``
  keeps the gradient scale independent of ``T``). Forward ``KL(p_t || p_s)`` is mode-covering (the
  classic KD); reverse ``KL(p_s || p_t)`` is mode-seeking (MiniLLM). Computed in fp32 with
  ``log_softmax`` (no log of a rounded 0).
- :func:`hidden_per_token`: ``1 - cos(h_s, h_t)`` (DistilBERT's cosine embedding loss with target 1)
  or the mean squared error over the width.
- :func:`mix`: ``(1 - alpha) * ce + alpha * kd + w * hidden``.

Tests: ``tests/distill/test_losses.py`` (against ``torch.nn.functional.kl_div`` / ``cosine_similarity``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kd_per_token(s: torch.Tensor, t: torch.Tensor, temperature: float = 1.0, kind: str = "fwd_kl") -> torch.Tensor:
    """``T^2 * KL`` per position: s, t [N, V] -> [N]; ``kind`` ``fwd_kl`` = KL(t||s), ``rev_kl`` = KL(s||t)."""
    if s.shape != t.shape:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} differ in shape")
    ls = F.log_softmax(s.float() / temperature, dim=-1)  # [N, V]
    lt = F.log_softmax(t.float() / temperature, dim=-1)  # [N, V]
    if kind == "fwd_kl":
        kl = (lt.exp() * (lt - ls)).sum(-1)
    elif kind == "rev_kl":
        kl = (ls.exp() * (ls - lt)).sum(-1)
    else:
        raise ValueError(f"unknown KD loss {kind!r} (fwd_kl, rev_kl)")
    return kl * (temperature * temperature)


def hidden_per_token(hs: torch.Tensor, ht: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    """hs, ht [N, D] (the student's already projected to D) -> [N]: ``1 - cos`` or mean squared error."""
    hs, ht = hs.float(), ht.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(hs, ht, dim=-1, eps=1e-8)
    if kind == "mse":
        return (hs - ht).pow(2).mean(-1)
    raise ValueError(f"unknown hidden-state loss {kind!r} (cosine, mse)")


def mix(ce: torch.Tensor, kd: torch.Tensor, alpha: float, hidden: torch.Tensor | None = None,
        hidden_weight: float = 0.0) -> torch.Tensor:
    """``(1 - alpha) * ce + alpha * kd (+ hidden_weight * hidden)``: the distillation objective."""
    out = (1.0 - alpha) * ce + alpha * kd
    if hidden is not None:
        out = out + hidden_weight * hidden
    return out


__all__ = ["hidden_per_token", "kd_per_token", "mix"]
