"""Training: the one trainer loop, its data pipeline, optimizers (``slimlm.train.optim``), checkpoints and
torch.distributed launch helpers. Fine-tuning (PEFT methods from ``slimlm.peft`` or full) and distillation
are driven by this one loop; nothing else writes a training loop.

Pieces: ``data`` (text / JSONL / chat -> packed windows), ``config`` (``TrainConfig``, ``AdapterArgs``),
``schedule`` (lr and GrowLength as functions of the step), ``loop`` (``Trainer``), ``checkpoint``
(atomic, bit-exact resume). Docs: docs/finetune.md; tests: tests/train/.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"TrainConfig": "config", "AdapterArgs": "config", "Trainer": "loop", "TrainResult": "loop",
         "read_examples": "data", "pack": "data", "collate": "data"}


def __getattr__(name: str) -> Any:  # lazy: ``slimlm.train.optim`` alone must not import the loop
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"slimlm.train.{_LAZY[name]}"), name)
    raise AttributeError(name)


__all__ = sorted(_LAZY)
