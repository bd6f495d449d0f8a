"""Knowledge distillation: a student learns from a frozen teacher through the one trainer loop.

Pieces: ``config`` (``DistillConfig``, recipe ``kind: distill``), ``losses`` (pure KD / hidden-state
functions), ``objective`` (``DistillLoss``: the trainer's ``loss_fn`` hook), ``student`` (every-other-
layer init or a saved student). The command is ``slimlm distill`` (``slimlm/cli/distill.py``); docs:
docs/distill.md; tests: tests/distill/. Imports go downward only (train, models, loaders).
"""

from __future__ import annotations

from typing import Any

_LAZY = {"DistillConfig": "config", "DistillLoss": "objective", "build_student": "student",
         "keep_layers_": "student", "layer_indices": "student", "kd_per_token": "losses",
         "hidden_per_token": "losses", "mix": "losses"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"slimlm.distill.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = sorted(_LAZY)
