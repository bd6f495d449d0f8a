"""The typed config base of every model transform (quantize, prune, factorize, convert-gqa, PEFT, ...).

A transform config is a :class:`slimlm.utils.config.BaseConfig` dataclass (JSON/YAML round trip,
CLI flags from its fields, ``metadata={"help", "min", "max"}``) with a ``family`` naming the command
that runs it. Module selection uses one pattern syntax (:mod:`slimlm.transforms.select`); a config
with an ``ignore`` field has its patterns checked on construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from slimlm.transforms.select import check_patterns, matches_any
from slimlm.utils.config import BaseConfig


@dataclass
class TransformConfig(BaseConfig):
    """Base of every transform config (not registered itself)."""

    family: ClassVar[str] = ""  # "quantize", "prune", "factorize", "convert-gqa", "peft", ...

    def validate(self) -> None:
        ignore = getattr(self, "ignore", None)
        if ignore is not None:
            check_patterns(list(ignore), self.kind)
        super().validate()

    def ignores(self, path: str) -> bool:
        """True when the full module ``path`` matches one of the config's ``ignore`` patterns."""
        return matches_any(list(getattr(self, "ignore", ())), path)
