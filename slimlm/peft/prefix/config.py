"""Prefix tuning's typed config (peft's ``PrefixTuningConfig`` for causal LMs), a transform config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from slimlm.transforms import TransformConfig


@dataclass
class PrefixTuningConfig(TransformConfig):
    """Prefix tuning (Li & Liang 2021): ``num_virtual_tokens`` trainable keys and values put before
    the tokens' in every layer's attention (the model stays frozen).

    Args:
        num_virtual_tokens: prefix length P (the tokens' positions then start at P, as in peft).
        prefix_projection: train the prefix through peft's reparameterization
            (``Embedding(P, kv) -> Linear(kv, H) -> tanh -> Linear(H, layers * 2 * kv)``); saved
            adapters always hold the computed keys/values, as peft's do.
        encoder_hidden_size: H, the projection's width.

    Example::

        apply_peft(lm.model, PrefixTuningConfig(num_virtual_tokens=8))
        logits = lm.model(ids)  # [B, T, V]: the prefix lives in the attention, not in the sequence
    """

    kind: ClassVar[str] = "prefix_tuning"
    family: ClassVar[str] = "peft"

    num_virtual_tokens: int = field(default=8, metadata={"help": "prefix length", "min": 1})
    prefix_projection: bool = field(default=False, metadata={"help": "train through an MLP reparameterization"})
    encoder_hidden_size: int = field(default=128, metadata={"help": "width of the projection MLP", "min": 1})
