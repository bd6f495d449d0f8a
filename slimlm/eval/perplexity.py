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

from slimlm.models.kv_policy import KVPolicy, make_cache
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
length is the default protocol.
--kv-policy P (int8, int4, window, full): each window runs through that KV cache (its keys/values stored and
read back quantized), so the perplexity includes the cache's rounding. --kv-policy streaming:S:W
or h2o:H:R (policies that evict) scores one stream instead: the first --max-tokens tokens are fed through the StreamingLLM cache
--stream-chunk tokens at a time (1 = exact StreamingLLM / H2O), and the last --score-last predictions are
scored (each conditioned on everything the cache kept)."""


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
                        progress: bool = True, kv_policy: KVPolicy | None = None) -> PerplexityResult:
    """The protocol of :data:`PROTOCOL`; ``kv_policy`` (not streaming) runs each window through that cache."""
    if kv_policy is not None and kv_policy.evicts:
        raise SlimlmError(f"the evicting KV policy {kv_policy} scores one stream: use evaluate_stream")
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
        cache = make_cache(kv_policy, model, 1, len(w)) if kv_policy is not None else None
        logits = model(w.unsqueeze(0), cache=cache)[0].float()  # [T, V]; logits[j] predicts w[j + 1]
        targets = w[first:]
        nll = F.cross_entropy(logits[first - 1 : -1], targets, reduction="sum")
        nll_sum += float(nll)
        scored += int(targets.numel())
    secs = time.perf_counter() - start
    mean = nll_sum / scored
    n_in = sum(e - s for s, e, _ in spans)
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens_scored=scored, windows=len(spans),
                            seq_len=seq_len, seconds=secs, tokens_per_s=n_in / secs if secs > 0 else float("inf"))


@dataclass
class StreamResult:
    perplexity: float
    nll: float
    tokens_scored: int
    tokens_streamed: int
    kv_bytes: int  # bytes the cache held at the end (constant once the window is full)
    kv_bytes_max: int  # the most it ever held (sampled after every chunk)
    seconds: float
    tokens_per_s: float

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@torch.no_grad()
def evaluate_stream(model: Transformer, ids: list[int] | torch.Tensor, policy: KVPolicy, score_last: int = 4000,
                    chunk: int = 1, max_tokens: int | None = None, progress: bool = True) -> StreamResult:
    """Feed one token stream through ``policy``'s cache ``chunk`` tokens at a time; score the last
    ``score_last`` next-token predictions. A bounded (streaming) policy may run past the model's
    context; any other must fit it."""
    if chunk < 1 or score_last < 1:
        raise SlimlmError(f"chunk ({chunk}) and score_last ({score_last}) must be >= 1")
    t = torch.as_tensor(ids, dtype=torch.long).flatten()
    if max_tokens is not None:
        t = t[:max_tokens]
    n = len(t)
    if n < score_last + 1:
        raise SlimlmError(f"text has {n} tokens; scoring the last {score_last} needs at least {score_last + 1}")
    if not policy.bounded:
        model.config.check_positions(n, "stream length")
    elif policy.sinks + policy.window + chunk > model.config.max_position_embeddings:
        raise SlimlmError(f"sinks + window + chunk ({policy.sinks + policy.window + chunk}) exceed the model's "
                          f"context of {model.config.max_position_embeddings}")
    cache = make_cache(policy, model, 1, n)
    first = n - 1 - score_last  # logits at stream index i predict token i + 1; score i in [first, n - 1)
    nll_sum, peak = 0.0, 0
    start = time.perf_counter()
    for s in tqdm(range(0, n - 1, chunk), desc="stream", unit="chunk", disable=not progress, dynamic_ncols=True):
        e = min(s + chunk, n - 1)
        logits = model(t[s:e].unsqueeze(0), cache=cache)[0].float()  # [e - s, V]
        lo = max(first, s)
        if lo < e:
            nll_sum += float(F.cross_entropy(logits[lo - s:], t[lo + 1:e + 1], reduction="sum"))
        peak = max(peak, cache.nbytes)
    secs = time.perf_counter() - start
    mean = nll_sum / score_last
    return StreamResult(perplexity=math.exp(mean), nll=mean, tokens_scored=score_last, tokens_streamed=n - 1,
                        kv_bytes=cache.nbytes, kv_bytes_max=peak, seconds=secs,
                        tokens_per_s=(n - 1) / secs if secs > 0 else float("inf"))
