"""Sequence-level (black-box) KD, Kim & Rush 2016: train on the teacher's outputs, not the data's.

Each example's prompt (its tokens before the first counted target; for plain text, the first half)
is continued by the teacher's greedy decoding, and the example becomes ``prompt + continuation``
with only the continuation counted. The decoding itself is a callable (``generate(prompts) ->
continuations``, token ids), so this layer needs no engine: ``slimlm distill`` passes the engine's
batched greedy generation (``slimlm.engine.llm.LLM``), a test may pass any function.

Example::

    examples = teacher_examples(examples, lambda ps: [g.token_ids for g in llm.generate(ps, params)])
"""

from __future__ import annotations

from collections.abc import Callable

from slimlm.train.data import IGNORE, Example


def prompt_of(example: Example, max_len: int | None = None) -> list[int]:
    """The tokens before the first counted target, or the first half of an all-target example."""
    k = next((i for i, lab in enumerate(example.labels) if lab != IGNORE), 0)
    k = k if k > 0 else max(1, len(example.ids) // 2)
    return list(example.ids[:k if max_len is None else min(k, max_len)])


def teacher_examples(examples: list[Example], generate: Callable[[list[list[int]]], list[list[int]]]) -> list[Example]:
    """``prompt + teacher continuation`` per example, only the continuation counted (empty ones dropped)."""
    prompts = [prompt_of(e) for e in examples]
    outs = generate(prompts)
    if len(outs) != len(prompts):
        raise ValueError(f"generate returned {len(outs)} continuations for {len(prompts)} prompts")
    return [Example(p + list(g), [IGNORE] * len(p) + list(g)) for p, g in zip(prompts, outs, strict=True) if g]


__all__ = ["prompt_of", "teacher_examples"]
