"""The one place slimlm times things: generation speed, single calls, interleaved rounds, summaries.

``slimlm bench`` (each variant in its worker process) and the scripts in ``benchmarks/`` call these,
so every number in a results file was taken the same way:

- :func:`time_generation`: one greedy ``generate`` of exactly ``new_tokens`` per prompt (EOS
  ignored) through the runtime's KV cache; prefill tok/s and time to first token come from the
  prefill step (the forward over the prompt and the choice of the first token), decode tok/s from
  the decode steps only (batch tokens per second).
- :func:`time_call`: median seconds of a callable after warm-up (optionally flushing the CPU caches
  before each timed call, as decode sees its weights).
- :func:`interleave`: round-robin rounds A, B, A, B ... so slow drift on a shared machine hits
  every variant alike; :func:`summarize` turns the samples into median / min / max / spread.

Example::

    s = time_generation(lm.model, lm.tokenizer, [prompt_ids], new_tokens=32)
    print(s["decode_tok_s"], s["ttft_s"])
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["flush_caches", "interleave", "stopwatch", "summarize", "time_call", "time_generation"]


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and relative spread ((max - min) / median) of repeated samples, with the samples."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("summarize needs at least one sample")
    med = statistics.median(vals)
    return {"median": med, "min": min(vals), "max": max(vals),
            "spread": (max(vals) - min(vals)) / med if med else 0.0, "n": len(vals), "runs": vals}


def stopwatch(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(result, seconds) of one call of ``fn``."""
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def time_generation(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], new_tokens: int,
                    ) -> dict[str, float]:
    """Speed of one greedy generation of ``new_tokens`` per prompt (a static batch of ``len(prompts)``).

    Returns prefill tok/s (prompt tokens of the batch / prefill seconds), ``ttft_s`` (the prefill
    step: forward over the prompts + choosing the first token), decode tok/s (batch tokens per
    second over the decode steps) and end-to-end tok/s (all new tokens / wall time).
    """
    from slimlm.engine.generate import generate
    from slimlm.engine.sampling import SamplingConfig

    cfg = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    res, secs = stopwatch(lambda: generate(model, tokenizer, [list(p) for p in prompts], cfg))
    if res.new_tokens != new_tokens * len(prompts):
        raise RuntimeError(f"generated {res.new_tokens} tokens, expected {new_tokens * len(prompts)}")
    return {"prefill_tok_s": res.prefill_tokens_per_s, "ttft_s": res.prefill_seconds,
            "decode_tok_s": res.decode_tokens_per_s, "e2e_tok_s": res.new_tokens / secs if secs > 0 else 0.0}


_FLUSH: torch.Tensor | None = None


def flush_caches() -> None:
    """Evict data from the CPU caches by reading a buffer larger than the last-level cache."""
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.ones(128 * 2**20 // 4)  # 128 MiB
    _FLUSH.sum()


def time_call(fn: Callable[[], Any], repeats: int, cold: bool = False, warmup: int = 3,
              budget_s: float = 2.0) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls; slow calls get fewer repeats (about ``budget_s``).

    ``cold``: caches are flushed before every timed call (decode reads each weight once per token).
    """
    with torch.inference_mode():
        _, first = stopwatch(fn)
        warmup = min(warmup, max(1, int(budget_s / 4 / max(first, 1e-9))))
        repeats = min(repeats, max(3, int(budget_s / max(first, 1e-9))))
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if cold:
                flush_caches()
            times.append(stopwatch(fn)[1])
    return statistics.median(times)


def interleave(measures: dict[str, Callable[[], dict[str, float]]], rounds: int, warmup: int = 1,
               on_step: Callable[[str, int], None] | None = None) -> dict[str, dict[str, list[float]]]:
    """Run every measure once per round, in order (A, B, A, B ...), after ``warmup`` untimed rounds.

    Each measure returns named numbers; the result maps name -> metric -> one sample per round.
    ``on_step(name, round)`` is called after each timed call (progress bars).
    """
    for _ in range(warmup):
        for fn in measures.values():
            fn()
    out: dict[str, dict[str, list[float]]] = {name: {} for name in measures}
    for r in range(rounds):
        for name, fn in measures.items():
            for k, v in fn().items():
                out[name].setdefault(k, []).append(float(v))
            if on_step is not None:
                on_step(name, r)
    return out
