"""Learning-rate and sequence-length schedules as pure functions of the step (resume needs nothing else).

``lr_factor(step, cfg)`` multiplies the peak lr: linear warm-up over ``warmup_steps`` (from 1/warmup),
then cosine or linear decay to ``min_lr_ratio`` at ``max_steps`` (``constant``: flat). It drives a
``torch.optim.lr_scheduler.LambdaLR``, so the scheduler's state dict is its step count.

``window_len(step, cfg)``: GrowLength (progressive sequence length): a quarter of ``seq_len`` in the
first third of the run, half in the second, the full length after; without ``grow_length``, ``seq_len``.
"""

from __future__ import annotations

import math

from slimlm.train.config import TrainConfig


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Factor of the peak lr for optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    span = max(cfg.max_steps - cfg.warmup_steps, 1)
    progress = min(max(step - cfg.warmup_steps, 0) / span, 1.0)
    lo = cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return lo + (1.0 - lo) * (1.0 - progress)
    return lo + (1.0 - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def window_len(step: int, cfg: TrainConfig) -> int:
    """Window length at optimizer step ``step`` (GrowLength stages, see module docstring)."""
    if not cfg.grow_length:
        return cfg.seq_len
    stage = min(3 * step // max(cfg.max_steps, 1), 2)
    return cfg.seq_len // (4, 2, 1)[stage]


def length_stages(cfg: TrainConfig) -> list[int]:
    """The distinct window lengths a run uses, in order."""
    return sorted({window_len(s, cfg) for s in range(cfg.max_steps)})
