"""LoRA's typed config (peft's ``LoraConfig`` fields where they mean the same), a transform config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from slimlm.transforms import TransformConfig
from slimlm.utils.errors import ConfigError

# peft's init_lora_weights True / "gaussian" / False / "pissa" / "loftq"
INITS = ("kaiming", "gaussian", "random", "pissa", "loftq")
LOFTQ_QUANTIZERS = ("nf4", "int4")


@dataclass
class LoraConfig(TransformConfig):
    """Low-rank adapters ``y = base(x) + scaling * B(A(dropout(x)))`` on the matching linears.

    Args:
        r: rank of ``A: [r, in]`` and ``B: [out, r]``.
        lora_alpha: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with ``use_rslora``: rank-stabilized).
        target_modules: module leaf names (``["q_proj", "v_proj"]``: any module whose path ends
            with one) or one regular expression matched against the whole runtime path
            (``r"model\\.layers\\.[01]\\..*proj"``).
        lora_dropout: dropout on the adapter's input in training mode.
        init_lora_weights: ``"kaiming"`` (A Kaiming-uniform, B zero: the adapter starts as a no-op),
            ``"gaussian"`` (A ~ N(0, 1/r), B zero), ``"random"`` (B Kaiming too: for tests),
            ``"pissa"`` (A, B from the top-r singular triplets of W, the base keeps the residual
            ``W - scaling * B A``: peft's PiSSA) or ``"loftq"`` (the base becomes ``Q`` quantized with
            ``loftq_quantizer`` and ``scaling * B A`` absorbs ``W - Q``: LoftQ's alternating
            quantize / SVD for ``loftq_iter`` rounds).
        use_rslora: rank-stabilized scaling ``lora_alpha / sqrt(r)``.
        use_dora: DoRA: a trainable magnitude per output row times the direction ``W + dW``
            normalized per row (the norm treated as a constant in backward, as in the paper and peft).
        loftq_quantizer / loftq_iter / loftq_group_size: LoftQ's base format (``nf4``: block 64 without
            double quantization, as bitsandbytes' ``Params4bit``; ``int4``: symmetric round-to-nearest,
            groups of ``loftq_group_size``), rounds, and int4 group size.

    Example::

        from slimlm.transforms import apply_transform
        report = apply_transform(lm.model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    """

    kind: ClassVar[str] = "lora"
    family: ClassVar[str] = "peft"

    r: int = field(default=8, metadata={"help": "LoRA rank", "min": 1})
    lora_alpha: float = field(default=8.0, metadata={"help": "scaling = lora_alpha / r", "gt": 0})
    target_modules: list[str] | str = field(default_factory=lambda: ["q_proj", "v_proj"],
                                            metadata={"help": "leaf names, or one regex over the path"})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter input", "min": 0, "lt": 1})
    init_lora_weights: str = field(default="kaiming", metadata={"help": f"one of {', '.join(INITS)}"})
    use_rslora: bool = field(default=False, metadata={"help": "scaling = lora_alpha / sqrt(r)"})
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    loftq_quantizer: str = field(default="nf4", metadata={"help": "LoftQ base format: nf4 or int4"})
    loftq_iter: int = field(default=1, metadata={"help": "LoftQ alternating rounds", "min": 1})
    loftq_group_size: int = field(default=64, metadata={"help": "LoftQ int4 group size", "min": 8})

    def validate(self) -> None:
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ConfigError(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.init_lora_weights not in INITS:
            raise ConfigError(f"init_lora_weights must be one of {INITS}, got {self.init_lora_weights!r}")
        if self.loftq_quantizer not in LOFTQ_QUANTIZERS:
            raise ConfigError(f"loftq_quantizer must be one of {LOFTQ_QUANTIZERS}, got {self.loftq_quantizer!r}")
        if self.use_dora and self.init_lora_weights in ("pissa", "loftq"):
            raise ConfigError(f"init_lora_weights={self.init_lora_weights!r} with use_dora is not supported")
        self.target_modules = check_targets(self.target_modules)
        super().validate()

    @property
    def scaling(self) -> float:
        return float(self.lora_alpha) / (self.r**0.5 if self.use_rslora else self.r)


def check_targets(targets: object, name: str = "target_modules", allow_empty: bool = False) -> list[str] | str:
    """A list of leaf names (as strings) or one regex string; a clear error otherwise."""
    if isinstance(targets, list | tuple):
        out = [str(t) for t in targets]
        if not out and not allow_empty:
            raise ConfigError(f"{name} is empty")
        return out
    if not isinstance(targets, str):
        raise ConfigError(f"{name} must be a list of names or a regex string, got {targets!r}")
    return targets
