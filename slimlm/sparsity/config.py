"""Typed configs for pruning (recipes and CLI flags come from these fields)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from slimlm.sparsity.masks import check_sparsity, parse_pattern
from slimlm.transforms import TransformConfig
from slimlm.transforms.select import DECODER_LINEARS, check_patterns, path_matches
from slimlm.utils.errors import ConfigError

P = TypeVar("P", bound="PruneConfig")
DEFAULT_TARGETS = DECODER_LINEARS


@dataclass
class PruneConfig(TransformConfig):
    """Unstructured / N:M pruning of the decoder's linear layers (embeddings and lm_head untouched).

    Version 2 (2026-12): ``group_size`` has the meaning it has in quantization (``-1`` = one group per
    row, ``0`` = per tensor); version-1 configs (``0`` = per row) are migrated on load.
    """

    kind: ClassVar[str] = "prune"
    family: ClassVar[str] = "prune"
    version: ClassVar[int] = 2
    method: Literal["magnitude", "wanda", "sparsegpt"] = field(
        default="sparsegpt", metadata={"help": "magnitude (no calibration), wanda or sparsegpt"})
    sparsity: float = field(default=0.5, metadata={"min": 0, "lt": 1, "help": "fraction of weights removed, in [0, 1)"})
    pattern: str = field(default="", metadata={"help": "N:M semi-structured pattern, e.g. 2:4 (overrides sparsity)"})
    scope: Literal["auto", "row", "layer"] = field(
        default="auto", metadata={"help": "magnitude/wanda comparison group: row or layer (auto: magnitude layer, wanda row)"})
    schedule: Literal["uniform", "linear"] = field(
        default="uniform", metadata={"help": "global schedule: uniform, or linear ramp over depth (mean = sparsity)"})
    schedule_delta: float = field(default=0.0, metadata={"gt": -1, "lt": 1, "help": "linear schedule: first layer sparsity - delta, last + delta"})
    layer_sparsity: dict[str, float] = field(
        default_factory=dict, metadata={"help": "per-module sparsity: {module path pattern: sparsity}, e.g. {\"mlp.down_proj\": 0.3}"})
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS),
                               metadata={"help": "linear paths inside each decoder layer to prune"})
    ignore: list[str] = field(default_factory=list, metadata={
        "help": "module path patterns (glob on the path or a dotted suffix, or 're:<regex>') left dense"})
    blocksize: int = field(default=128, metadata={"min": 1, "help": "SparseGPT: columns per block (mask chosen per block)"})
    dampening: float = field(default=0.01, metadata={"min": 0, "lt": 1, "help": "SparseGPT: damp = dampening * mean(diag(H))"})
    bits: int = field(default=0, metadata={"min": 0, "max": 8, "help": "SparseGPT: also quantize the kept weights to this many bits (0 = off)"})
    group_size: int = field(default=128, metadata={"min": -1, "help": "SparseGPT --bits: input columns per scale group (a row that is no multiple of it ends "
                               "in a shorter group); -1 = per row, 0 = per tensor"})
    storage: Literal["sparse", "dense"] = field(
        default="sparse", metadata={"help": "sparse: compact SparseLinear modules; dense: zeros in nn.Linear"})
    exec: Literal["auto", "dense", "csr"] = field(
        default="auto", metadata={"help": "sparse modules' run-time path (auto picks the measured faster one)"})

    def validate(self) -> None:
        check_sparsity(self.sparsity)
        parse_pattern(self.pattern)
        if self.blocksize < 1:
            raise ConfigError(f"blocksize must be >= 1, got {self.blocksize}")
        if not 0 <= self.dampening < 1:
            raise ConfigError(f"dampening must be in [0, 1), got {self.dampening}")
        if self.bits and not 2 <= self.bits <= 8:
            raise ConfigError(f"bits must be 0 (off) or 2..8, got {self.bits}")
        if self.bits and self.method != "sparsegpt":
            raise ConfigError("joint pruning + quantization (bits > 0) needs method sparsegpt")
        if self.group_size < -1:
            raise ConfigError(f"group_size must be -1 (per row), 0 (per tensor) or positive, got {self.group_size}")
        if self.bits and self.group_size > 0 and self.blocksize % self.group_size:
            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of group_size {self.group_size}")
        for k, v in self.layer_sparsity.items():
            try:
                check_sparsity(v)
            except ConfigError:
                raise ConfigError(f"layer_sparsity[{k!r}] must be in [0, 1), got {v}") from None
        if self.schedule == "linear" and not (
                0 <= self.sparsity - abs(self.schedule_delta) and self.sparsity + abs(self.schedule_delta) < 1):
            raise ConfigError(f"linear schedule {self.sparsity} +- {self.schedule_delta} leaves [0, 1)")
        check_patterns(list(self.layer_sparsity), self.kind)
        super().validate()

    @classmethod
    def from_dict(cls: type[P], data: dict[str, Any]) -> P:
        if isinstance(data, dict) and data.get("version") == 1:  # group_size 0 meant per row then
            data = {**data, "version": 2, "group_size": -1 if data.get("group_size") == 0 else data.get("group_size", 128)}
        return super().from_dict(data)

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def mask_scope(self) -> str:
        if self.scope != "auto":
            return self.scope
        return "layer" if self.method == "magnitude" else "row"

    def sparsity_for(self, layer_idx: int, n_layers: int, path: str) -> float | None:
        """Target sparsity of ``model.layers.<layer_idx>.<path>``; None = leave it dense."""
        name = f"model.layers.{layer_idx}.{path}"
        if self.ignores(name):
            return None
        for g, v in self.layer_sparsity.items():
            if path_matches(g, name):
                return float(v)
        if self.schedule == "linear" and n_layers > 1:
            return self.sparsity + self.schedule_delta * (2.0 * layer_idx / (n_layers - 1) - 1.0)
        return self.sparsity
