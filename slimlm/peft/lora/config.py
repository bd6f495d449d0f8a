"""LoRA's typed config (peft's ``LoraConfig`` fields where they mean the same, versioned)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from slimlm.utils.errors import ConfigError

INITS = ("kaiming", "gaussian", "random")  # peft's init_lora_weights True / "gaussian" / False


@dataclass
class LoraConfig:
    """Low-rank adapters ``y = base(x) + scaling * B(A(dropout(x)))`` on the matching linears.

    Args:
        r: rank of ``A: [r, in]`` and ``B: [out, r]``.
        lora_alpha: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``: rank-stabilized).
        target_modules: module leaf names (``["q_proj", "v_proj"]``: any module whose path ends
            with one) or one regular expression matched against the whole runtime path
            (``r"model\\.layers\\.[01]\\..*proj"``).
        lora_dropout: dropout on the adapter's input in training mode.
        init_lora_weights: ``"kaiming"`` (A Kaiming-uniform, B zero: the adapter starts as a no-op),
            ``"gaussian"`` (A ~ N(0, 1/r), B zero) or ``"random"`` (B Kaiming too: for tests).
        use_rslora: rank-stabilized scaling ``lora_alpha / sqrt(r)``.
        use_dora: DoRA: a trainable magnitude per output row times the direction ``W + dW``
            normalized per row (the norm treated as a constant in backward, as in the paper and peft).

    Example::

        from slimlm.peft import apply_peft, LoraConfig
        report = apply_peft(lm.model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    """

    r: int = 8
    lora_alpha: float = 8.0
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"])
    lora_dropout: float = 0.0
    init_lora_weights: str = "kaiming"
    use_rslora: bool = False
    use_dora: bool = False
    version: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.init_lora_weights not in INITS:
            raise ConfigError(f"init_lora_weights must be one of {INITS}, got {self.init_lora_weights!r}")
        if isinstance(self.target_modules, list | tuple):
            self.target_modules = [str(t) for t in self.target_modules]
            if not self.target_modules:
                raise ConfigError("target_modules is empty")
        elif not isinstance(self.target_modules, str):
            raise ConfigError(f"target_modules must be a list of names or a regex string, got {self.target_modules!r}")
        if self.version != 1:
            raise ConfigError(f"LoraConfig version {self.version} is not supported (this slimlm writes 1)")

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / (self.r**0.5 if self.use_rslora else self.r)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
