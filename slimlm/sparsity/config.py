"""Typed configs for pruning (recipes and CLI flags come from these fields)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from slimlm.sparsity.masks import check_sparsity, parse_pattern
from slimlm.utils.config import BaseConfig, register_config
from slimlm.utils.errors import ConfigError

DEFAULT_TARGETS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@register_config
@dataclass
class PruneConfig(BaseConfig):
    """Unstructured / N:M pruning of the decoder's linear layers (embeddings and lm_head untouched)."""

    kind: ClassVar[str] = "prune"
    method: Literal["magnitude", "wanda", "sparsegpt"] = field(
        default="sparsegpt", metadata={"help": "magnitude (no calibration), wanda or sparsegpt"})
    sparsity: float = field(default=0.5, metadata={"help": "fraction of weights removed, in [0, 1)", "min": 0, "lt": 1})
    pattern: str = field(default="", metadata={"help": "N:M semi-structured pattern, e.g. 2:4 (overrides sparsity)"})
    scope: Literal["auto", "row", "layer"] = field(
        default="auto", metadata={"help": "magnitude/wanda comparison group: row or layer (auto: magnitude layer, wanda row)"})
    schedule: Literal["uniform", "linear"] = field(
        default="uniform", metadata={"help": "global schedule: uniform, or linear ramp over depth (mean = sparsity)"})
    schedule_delta: float = field(default=0.0, metadata={"help": "linear schedule: first layer sparsity - delta, last + delta", "gt": -1, "lt": 1})
    layer_sparsity: dict[str, float] = field(
        default_factory=dict, metadata={"help": "per-module overrides: glob on 'layers.<i>.<path>' -> sparsity"})
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS),
                               metadata={"help": "linear paths inside each decoder layer to prune"})
    ignore: list[str] = field(default_factory=list, metadata={"help": "globs on 'layers.<i>.<path>' to leave dense"})
    blocksize: int = field(default=128, metadata={"help": "SparseGPT: columns per block (mask chosen per block)", "min": 1})
    dampening: float = field(default=0.01, metadata={"help": "SparseGPT: damp = dampening * mean(diag(H))", "min": 0, "lt": 1})
    bits: int = field(default=0, metadata={"help": "SparseGPT: also quantize the kept weights to this many bits (0 = off)", "min": 0, "max": 8})
    group_size: int = field(default=128, metadata={"help": "quantization group size along the input (0 = per row)", "min": 0})
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
        if self.group_size < 0:
            raise ConfigError(f"group_size must be >= 0, got {self.group_size}")
        if self.bits and self.group_size and self.blocksize % self.group_size:
            raise ConfigError(f"blocksize {self.blocksize} must be a multiple of group_size {self.group_size}")
        for k, v in self.layer_sparsity.items():
            try:
                check_sparsity(v)
            except ConfigError:
                raise ConfigError(f"layer_sparsity[{k!r}] must be in [0, 1), got {v}") from None
        if self.schedule == "linear" and not (
                0 <= self.sparsity - abs(self.schedule_delta) and self.sparsity + abs(self.schedule_delta) < 1):
            raise ConfigError(f"linear schedule {self.sparsity} +- {self.schedule_delta} leaves [0, 1)")

    @property
    def nm(self) -> tuple[int, int] | None:
        return parse_pattern(self.pattern)

    @property
    def mask_scope(self) -> str:
        if self.scope != "auto":
            return self.scope
        return "layer" if self.method == "magnitude" else "row"

    def sparsity_for(self, layer_idx: int, n_layers: int, path: str) -> float | None:
        """Target sparsity of ``layers.<layer_idx>.<path>``; None = leave it dense."""
        name = f"layers.{layer_idx}.{path}"
        if any(fnmatch.fnmatchcase(name, g) for g in self.ignore):
            return None
        for g, v in self.layer_sparsity.items():
            if fnmatch.fnmatchcase(name, g):
                return float(v)
        if self.schedule == "linear" and n_layers > 1:
            return self.sparsity + self.schedule_delta * (2.0 * layer_idx / (n_layers - 1) - 1.0)
        return self.sparsity
