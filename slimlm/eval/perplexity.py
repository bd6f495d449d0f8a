"""Perplexity with the GPTQ-paper protocol by default.

Tokenize the whole text once, cut non-overlapping windows of ``seq_len`` (tail dropped), score
each window independently, ``ppl = exp(total NLL / scored tokens)``. Options: ``stride`` for
overlapping windows (each window scores only its last ``stride`` tokens, after the first),
``bos_id`` to prepend BOS to every window, ``max_tokens`` to score only the beginning.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from slimlm.models.transformer import Transformer
from slimlm.utils.errors import SlimlmError


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens_scored: int
    windows: int
    seq_len: int
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def windows(n_tokens: int, seq_len: int, stride: int | None) -> list[tuple[int, int, int]]:
    """(start, end, first scored index inside the window) for each window."""
    if stride is None or stride >= seq_len:
        return [(s, s + seq_len, 1) for s in range(0, n_tokens - seq_len + 1, seq_len)]
    out = [(0, seq_len, 1)]
    s = stride
    while s + seq_len <= n_tokens:
        out.append((s, s + seq_len, seq_len - stride))
        s += stride
    return out


@torch.no_grad()
def evaluate_perplexity(model: Transformer, ids: list[int] | torch.Tensor, seq_len: int = 2048,
                        stride: int | None = None, bos_id: int | None = None, max_tokens: int | None = None,
                        progress: bool = True) -> PerplexityResult:
    t = torch.as_tensor(ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        t = t[:max_tokens]
    body = seq_len - 1 if bos_id is not None else seq_len
    if body < 2:
        raise SlimlmError(f"seq_len {seq_len} is too short")
    if seq_len > model.config.max_position_embeddings and model.config.learned_pos:
        raise SlimlmError(f"seq_len {seq_len} exceeds the model's context of {model.config.max_position_embeddings}")
    spans = windows(len(t), body, stride)
    if not spans:
        raise SlimlmError(f"text has {len(t)} tokens, fewer than one window of {body}")
    nll_sum, scored = 0.0, 0
    start = time.perf_counter()
    for s, e, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress, dynamic_ncols=True):
        w = t[s:e]
        if bos_id is not None:
            w = torch.cat([torch.tensor([bos_id]), w])
            first += 1
        logits = model(w.unsqueeze(0))[0].float()  # [T, V]
        targets = w[first:]
        nll = F.cross_entropy(logits[first - 1 : -1], targets, reduction="sum")
        nll_sum += float(nll)
        scored += int(targets.numel())
    secs = time.perf_counter() - start
    mean = nll_sum / scored
    n_in = sum(e - s for s, e, _ in spans)
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens_scored=scored, windows=len(spans),
                            seq_len=seq_len, seconds=secs, tokens_per_s=n_in / secs if secs > 0 else float("inf"))
