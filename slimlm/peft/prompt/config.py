"""Prompt tuning's typed config (peft's ``PromptTuningConfig`` for causal LMs), a transform config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from slimlm.transforms import TransformConfig
from slimlm.utils.errors import ConfigError


@dataclass
class PromptTuningConfig(TransformConfig):
    """``num_virtual_tokens`` trainable embeddings put before every input (the model stays frozen).

    Args:
        num_virtual_tokens: how many virtual tokens (rows of ``prompt_embeddings: [P, hidden]``).
        prompt_tuning_init: ``"random"`` (N(0, 1) rows, peft's RANDOM) or ``"sample_vocab"`` (copies of
            randomly drawn token embeddings, peft's SAMPLE_VOCAB).

    Example::

        apply_peft(lm.model, PromptTuningConfig(num_virtual_tokens=8))
        logits = lm.model(ids)[:, 8:]  # the virtual tokens' positions come first
    """

    kind: ClassVar[str] = "prompt_tuning"
    family: ClassVar[str] = "peft"

    num_virtual_tokens: int = field(default=8, metadata={"help": "virtual tokens", "min": 1})
    prompt_tuning_init: str = field(default="random", metadata={"help": "random or sample_vocab"})

    def validate(self) -> None:
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.prompt_tuning_init not in ("random", "sample_vocab"):
            raise ConfigError(f"prompt_tuning_init must be random or sample_vocab, got {self.prompt_tuning_init!r}")
        super().validate()
