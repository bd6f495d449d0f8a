"""IA3's typed config (peft's ``IA3Config`` fields), a transform config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from slimlm.peft.lora.config import check_targets
from slimlm.transforms import TransformConfig


@dataclass
class IA3Config(TransformConfig):
    """(IA)^3: learned vectors that rescale activations; the cheapest PEFT method (one vector a layer).

    Args:
        target_modules: module leaf names or one regex over the runtime path (as LoRA).
        feedforward_modules: the targets whose *input* is scaled (``l: [1, in]``, the MLP's down
            projection in the paper); the others scale their output (``l: [out, 1]``: keys, values).
        init_ia3_weights: vectors start at 1 (the base model); False draws them from N(0, 1) (tests).

    Example::

        apply_peft(lm.model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                       feedforward_modules=["down_proj"]))
    """

    kind: ClassVar[str] = "ia3"
    family: ClassVar[str] = "peft"

    target_modules: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"],
                                            metadata={"help": "leaf names, or one regex over the path"})
    feedforward_modules: list[str] | str = field(default_factory=lambda: ["down_proj"],
                                                 metadata={"help": "targets whose input is scaled"})
    init_ia3_weights: bool = field(default=True, metadata={"help": "start at 1 (no-op)"})

    def validate(self) -> None:
        self.target_modules = check_targets(self.target_modules)
        self.feedforward_modules = check_targets(self.feedforward_modules, "feedforward_modules", allow_empty=True)
        super().validate()
