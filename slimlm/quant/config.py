"""Shared fields of every quantization config: which modules to skip, per-module overrides.

Each method's config (``slimlm/quant/methods/*.py``) subclasses :class:`QuantConfigBase` (weight-
only integer methods subclass :class:`WeightQuantConfig`) and is registered, so a recipe file is
just the serialized config::

    kind: gptq
    bits: 4
    group_size: 128
    ignore: [lm_head]
    overrides: {"mlp.down_proj": {bits: 8}}

Module patterns are the one syntax of every transform (:mod:`slimlm.transforms.select`): full module
paths (``model.layers.3.mlp.down_proj``) matched by a glob on the path or any dotted suffix of it
(``down_proj``, ``mlp.*_proj``, ``model.layers.0.*``), or ``re:<regex>`` searched in the path. Embeddings are never quantized
by these methods (they are not linears); ``lm_head`` is skipped by default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from slimlm.quant.primitives import check_bits
from slimlm.transforms.config import TransformConfig
from slimlm.transforms.select import check_patterns, path_matches
from slimlm.utils.errors import ConfigError

C = TypeVar("C", bound="QuantConfigBase")
W = TypeVar("W", bound="WeightQuantConfig")


@dataclass
class QuantConfigBase(TransformConfig):
    """Fields every quantization method has (not registered itself)."""

    family: ClassVar[str] = "quantize"

    ignore: list[str] = field(
        default_factory=lambda: ["lm_head"],
        metadata={"help": "module path patterns (glob, or 're:<regex>') left unquantized"},
    )
    overrides: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata={"help": "per-module field overrides: {pattern: {field: value}}, e.g. {\"down_proj\": {\"bits\": 8}}"},
    )

    def validate(self) -> None:
        check_patterns(list(self.overrides), self.kind)
        for pat, ov in self.overrides.items():
            if not isinstance(ov, dict):
                raise ConfigError(f"{self.kind}: override for {pat!r} must be a mapping of fields")
            if "ignore" in ov or "overrides" in ov:
                raise ConfigError(f"{self.kind}: override for {pat!r} may not set 'ignore'/'overrides'")
            self._merged(ov)  # raises ConfigError naming a bad key/value
        super().validate()  # the ignore patterns

    def _merged(self: C, ov: dict[str, Any]) -> C:
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        base.update(ignore=[], overrides={})
        try:
            return type(self).from_dict({**base, **ov})
        except ConfigError as e:
            raise ConfigError(f"in override: {e}") from None

    def for_module(self: C, path: str) -> C | None:
        """The config that applies to the module at ``path``, or None when it stays unquantized.

        Later override patterns win over earlier ones.
        """
        if self.ignores(path):
            return None
        merged: dict[str, Any] = {}
        for pat, ov in self.overrides.items():
            if path_matches(pat, path):
                merged.update(ov)
        if not merged:
            return self
        return self._merged(merged)

    def short(self) -> str:
        """One-line description for plans and reports."""
        skip = {"ignore", "overrides"}
        parts = [f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if f.name not in skip]
        return f"{self.kind}(" + ", ".join(parts) + ")"


@dataclass
class WeightQuantConfig(QuantConfigBase):
    """Integer weight quantization fields shared by RTN, GPTQ and AWQ."""

    bits: int = field(default=4, metadata={"min": 2, "max": 8, "help": "bits per weight (2-8)"})
    group_size: int = field(
        default=128, metadata={"min": -1, "help": "input columns per scale group (a row that is no multiple of it ends in a "
                                 "shorter group); -1 = per channel (one group per row), 0 = per tensor"}
    )
    symmetric: bool = field(default=False, metadata={"help": "symmetric (absmax) grid instead of min/max"})

    @classmethod
    def from_dict(cls: type[W], data: dict[str, Any]) -> W:
        # ``ragged_last_group`` (before 2026-12): a group size that does not divide a row now always
        # leaves a shorter last group, so the key is accepted and dropped
        if isinstance(data, dict) and "ragged_last_group" in data:
            data = {k: v for k, v in data.items() if k != "ragged_last_group"}
        return super().from_dict(data)

    def validate(self) -> None:
        check_bits(self.bits)
        if self.group_size < -1:
            raise ConfigError(f"{self.kind}: group_size must be -1, 0 or positive, got {self.group_size}")
        super().validate()
