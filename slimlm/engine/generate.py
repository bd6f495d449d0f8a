"""Generation: batched prefill + a lean decode loop through the preallocated KV cache.

Ragged prompts are left-padded and masked; positions count real tokens only. Stops per sequence at
EOS (the tokenizer's end-of-turn tokens included) or a stop string; streams text for batch 1.

Example::

    res = generate(lm.model, lm.tokenizer, [lm.tokenizer.encode("The capital of France is")],
                   SamplingConfig(max_new_tokens=16))
    print(res.texts[0], res.decode_tokens_per_s)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from slimlm.engine.sampling import SamplingConfig, choose
from slimlm.models.kv_policy import KVPolicy, make_cache
from slimlm.models.transformer import Transformer
from slimlm.utils.errors import SlimlmError


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per sequence (stop tokens excluded)
    texts: list[str]
    finish_reasons: list[str]  # "eos" | "stop" | "length"
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Batch tokens per second over the decode steps (the first token comes from prefill)."""
        b = len(self.tokens)
        return self.decode_steps * b / self.decode_seconds if self.decode_seconds > 0 else 0.0


def eos_ids(model: Transformer, tokenizer) -> set[int]:  # type: ignore[no-untyped-def]
    ids: set[int] = set()
    if tokenizer is not None:
        ids |= set(getattr(tokenizer, "eos_token_ids", set()) or set())
    eos = model.config.eos_token_id
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids |= set(eos)
    return ids


@torch.inference_mode()
def generate(model: Transformer, tokenizer, prompts: Sequence[Sequence[int]], cfg: SamplingConfig,  # type: ignore[no-untyped-def]
             on_text: Callable[[str], None] | None = None, kv_policy: KVPolicy | None = None) -> GenerationResult:
    """``kv_policy`` picks the KV cache (:mod:`slimlm.models.kv_policy`; default: full). A streaming
    policy may generate past the model's context (constant KV memory) for prompts of equal length."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise SlimlmError("every prompt needs at least one token")
    b = len(prompts)
    lens = [len(p) for p in prompts]
    t0 = max(lens)
    total = t0 + cfg.max_new_tokens
    ctx_len = model.config.max_position_embeddings
    if t0 >= ctx_len:
        raise SlimlmError(f"prompt has {t0} tokens; the model's context is {ctx_len}")
    bounded = kv_policy is not None and kv_policy.bounded
    if total > ctx_len and not bounded:
        raise SlimlmError(f"prompt ({t0} tokens) + max_new_tokens ({cfg.max_new_tokens}) exceeds the context of {ctx_len}")
    pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    ids = torch.full((b, t0), pad, dtype=torch.long)
    mask = torch.zeros(b, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, t0 - len(p):] = torch.tensor(list(p), dtype=torch.long)
        mask[i, t0 - len(p):] = 1
    ragged = min(lens) != t0
    if ragged and kv_policy is not None and kv_policy.evicts:
        raise SlimlmError(f"the KV policy {kv_policy} needs prompts of equal length (it ignores padding masks)")
    mask[:, t0:] = 1
    cache = make_cache(kv_policy or KVPolicy(), model, b, total)
    stops = eos_ids(model, tokenizer) if not cfg.ignore_eos else set()
    gen = torch.Generator().manual_seed(cfg.seed)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(b, model.config.vocab_size, dtype=torch.bool)
        seen.scatter_(1, ids, True)
        if ragged:
            seen[:, pad] = torch.tensor([pad in p for p in prompts])

    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    reasons = ["length"] * b
    texts = [""] * b
    streamer = None
    if on_text is not None and tokenizer is not None and b == 1:
        from slimlm.loaders.tokenizer import StreamDecoder

        streamer = StreamDecoder(tokenizer)

    start = time.perf_counter()
    logits = model(ids, cache=cache, attention_mask=mask[:, :t0] if ragged else None, last_only=True)[:, -1]
    nxt = choose(logits, cfg, seen, gen)
    prefill_s = time.perf_counter() - start
    positions = torch.tensor(lens, dtype=torch.long).unsqueeze(1)  # next position per row: [B, 1]
    steps = 0
    dstart = time.perf_counter()
    for step in range(cfg.max_new_tokens):
        toks = nxt.tolist()
        for i, tok in enumerate(toks):
            if done[i]:
                continue
            if tok in stops:
                done[i], reasons[i] = True, "eos"
                continue
            out[i].append(tok)
            if streamer is not None:
                piece = streamer.feed(tok)
                if piece and on_text is not None:
                    on_text(piece)
            if cfg.stop and tokenizer is not None:
                texts[i] = tokenizer.decode(out[i])
                hit = _find_stop(texts[i], cfg.stop)
                if hit is not None:
                    texts[i] = texts[i][:hit]
                    done[i], reasons[i] = True, "stop"
        if all(done) or step == cfg.max_new_tokens - 1:
            break
        if seen is not None:
            seen.scatter_(1, nxt.unsqueeze(1), True)
        cur = cache.length + 1
        # unpadded rows: the cache's own positions (a streaming cache assigns them within itself)
        logits = model(nxt.unsqueeze(1), positions=positions if ragged else None, cache=cache,
                       attention_mask=mask[:, :cur] if ragged else None)[:, -1]
        positions = positions + 1
        nxt = choose(logits, cfg, seen, gen)
        steps += 1
    decode_s = time.perf_counter() - dstart
    if streamer is not None and on_text is not None:
        tail = streamer.flush()
        if tail:
            on_text(tail)
    for i in range(b):
        if reasons[i] != "stop" and tokenizer is not None:
            texts[i] = tokenizer.decode(out[i])
    return GenerationResult(tokens=out, texts=texts, finish_reasons=reasons, prompt_tokens=sum(lens),
                            prefill_seconds=prefill_s, decode_seconds=decode_s, decode_steps=steps)


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [text.find(s) for s in stops if s and s in text]
    return min(hits) if hits else None
