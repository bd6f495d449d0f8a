"""IA3's typed config (peft's ``IA3Config`` fields, versioned)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slimlm.utils.errors import ConfigError


@dataclass
class IA3Config:
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

    target_modules: list[str] | str = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_modules: list[str] | str = field(default_factory=lambda: ["down_proj"])
    init_ia3_weights: bool = True
    version: int = 1

    def __post_init__(self) -> None:
        for name in ("target_modules", "feedforward_modules"):
            v = getattr(self, name)
            if isinstance(v, list | tuple):
                setattr(self, name, [str(t) for t in v])
            elif not isinstance(v, str):
                raise ConfigError(f"{name} must be a list of names or a regex string, got {v!r}")
        if not self.target_modules:
            raise ConfigError("target_modules is empty")
        if self.version != 1:
            raise ConfigError(f"IA3Config version {self.version} is not supported (this slimlm writes 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
