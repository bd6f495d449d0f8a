"""Perplexity with the GPTQ-paper protocol by default; :data:`PROTOCOL` states it exactly.

``slimlm eval --help`` prints :data:`PROTOCOL`; tests/eval/test_perplexity.py checks every variant
against NLLs computed by hand from transformers' logits.
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

PROTOCOL = """\
Protocol: the text is tokenized once, without special tokens (--max-tokens N keeps the first N).
Default (GPTQ paper): non-overlapping windows of --seq-len tokens, a tail shorter than a window
dropped; each window is scored on its own, every token but its first (seq-len - 1 per window);
perplexity = exp(total NLL / scored tokens).
--bos: each window is BOS + (seq-len - 1) text tokens and every text token is scored, the first
one conditioned on BOS alone (as lm-evaluation-harness does): still seq-len - 1 per window.
--stride S: windows start every S text tokens; the first is scored as above, each later one only
on its last S tokens (the rest is context), so no token is scored twice; S >= the window's text
length is the default protocol."""


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


def windows(n_tokens: int, length: int, stride: int | None, first: int = 1) -> list[tuple[int, int, int]]:
    """(start, end, first scored index inside the span) for each text span of ``length`` tokens.

    ``first`` is where the first window's scoring starts: 1 without BOS (token 0 has no context), 0
    with BOS. Later overlapping windows score their last ``stride`` tokens only.
    """
    if length < 1 or (stride is not None and stride < 1):
        raise SlimlmError(f"window length ({length}) and stride ({stride}) must be >= 1")
    if stride is None or stride >= length:
        return [(s, s + length, first) for s in range(0, n_tokens - length + 1, length)]
    out = [(0, length, first)] if n_tokens >= length else []
    s = stride
    while s + length <= n_tokens:
        out.append((s, s + length, length - stride))
        s += stride
    return out


@torch.no_grad()
def evaluate_perplexity(model: Transformer, ids: list[int] | torch.Tensor, seq_len: int = 2048,
                        stride: int | None = None, bos_id: int | None = None, max_tokens: int | None = None,
                        progress: bool = True) -> PerplexityResult:
    if seq_len < 2:
        raise SlimlmError(f"seq_len must be >= 2, got {seq_len}")
    if stride is not None and stride < 1:
        raise SlimlmError(f"stride must be >= 1, got {stride}")
    if max_tokens is not None and max_tokens < 1:
        raise SlimlmError(f"max_tokens must be >= 1, got {max_tokens}")
    model.config.check_positions(seq_len, "seq_len")
    t = torch.as_tensor(ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        t = t[:max_tokens]
    body = seq_len - 1 if bos_id is not None else seq_len  # text tokens per window
    spans = windows(len(t), body, stride, first=0 if bos_id is not None else 1)
    if not spans:
        raise SlimlmError(f"text has {len(t)} tokens, fewer than one window of {body}")
    nll_sum, scored = 0.0, 0
    start = time.perf_counter()
    for s, e, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress, dynamic_ncols=True):
        w = t[s:e]
        if bos_id is not None:  # w: [BOS, text...]; text index i sits at window position i + 1
            w = torch.cat([torch.tensor([bos_id]), w])
            first += 1
        logits = model(w.unsqueeze(0))[0].float()  # [T, V]; logits[j] predicts w[j + 1]
        targets = w[first:]
        nll = F.cross_entropy(logits[first - 1 : -1], targets, reduction="sum")
        nll_sum += float(nll)
        scored += int(targets.numel())
    secs = time.perf_counter() - start
    mean = nll_sum / scored
    n_in = sum(e - s for s, e, _ in spans)
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens_scored=scored, windows=len(spans),
                            seq_len=seq_len, seconds=secs, tokens_per_s=n_in / secs if secs > 0 else float("inf"))
