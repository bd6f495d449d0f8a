"""Houlsby bottleneck adapters' typed config, a transform config (slimlm's own format: peft has none)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from slimlm.peft.lora.config import check_targets
from slimlm.transforms import TransformConfig
from slimlm.utils.errors import ConfigError

ACTIVATIONS = ("relu", "gelu", "silu", "tanh")


@dataclass
class HoulsbyConfig(TransformConfig):
    """Bottleneck adapters (Houlsby et al. 2019): ``h + up(act(down(h)))`` on the output of each
    targeted projection, i.e. after attention (``o_proj``) and after the MLP (``down_proj``), before
    the residual add. ``up`` starts at zero, so the model starts unchanged.

    Args:
        target_modules: the projections whose output is adapted (leaf names or one regex).
        bottleneck_size: the width of ``down: [m, d]`` / ``up: [d, m]``.
        non_linearity: relu, gelu, silu or tanh.
        adapter_dropout: dropout on the bottleneck in training mode.

    Example::

        apply_peft(lm.model, HoulsbyConfig(bottleneck_size=16))
    """

    kind: ClassVar[str] = "houlsby"
    family: ClassVar[str] = "peft"

    target_modules: list[str] | str = field(default_factory=lambda: ["o_proj", "down_proj"],
                                            metadata={"help": "projections whose output is adapted"})
    bottleneck_size: int = field(default=16, metadata={"help": "bottleneck width", "min": 1})
    non_linearity: str = field(default="relu", metadata={"help": f"one of {', '.join(ACTIVATIONS)}"})
    adapter_dropout: float = field(default=0.0, metadata={"help": "dropout in the bottleneck", "min": 0, "lt": 1})

    def validate(self) -> None:
        if self.non_linearity not in ACTIVATIONS:
            raise ConfigError(f"non_linearity must be one of {ACTIVATIONS}, got {self.non_linearity!r}")
        self.target_modules = check_targets(self.target_modules)
        super().validate()
