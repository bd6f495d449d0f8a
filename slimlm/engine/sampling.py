"""Logit processing and token choice: repetition penalty, temperature, top-k, top-p (pure functions)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from slimlm.utils.config import BaseConfig, register_config


@register_config
@dataclass
class SamplingConfig(BaseConfig):
    kind: ClassVar[str] = "sampling"
    max_new_tokens: int = field(default=128, metadata={"help": "tokens to generate at most", "min": 1})
    temperature: float = field(default=0.0, metadata={"help": "0 = greedy; >0 samples from softmax(logits/T)", "min": 0})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0 = off)", "min": 0})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1.0 = off)", "gt": 0, "max": 1})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL-style penalty on seen tokens (1.0 = off)", "gt": 0})
    seed: int = field(default=0, metadata={"help": "random seed for sampling", "min": 0, "max": 2**63 - 1})
    stop: list[str] = field(default_factory=list, metadata={"help": "stop strings"})
    ignore_eos: bool = field(default=False, metadata={"help": "keep generating past EOS (for benchmarks)"})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits: [B, V]; seen: [B, V] bool. Negative logits are multiplied, positive divided."""
    if penalty == 1.0:
        return logits
    pen = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, pen, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside the top-k and the top-p nucleus. logits: [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """The distribution a sampled (temperature > 0) request draws from: logits [B, V] -> probs [B, V]
    (temperature, then top-k / top-p). Speculative verification compares these for target and draft."""
    return filter_top_k_top_p(logits.float() / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1)


def choose(logits: torch.Tensor, cfg: SamplingConfig, seen: torch.Tensor | None,
           gen: torch.Generator | None) -> torch.Tensor:
    """Next tokens [B] from last-position logits [B, V]."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, cfg.repetition_penalty)
    if cfg.greedy:
        return logits.argmax(-1)
    return torch.multinomial(probs(logits, cfg), 1, generator=gen).squeeze(-1)
