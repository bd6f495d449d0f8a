"""One request as the scheduler sees it: token ids, how many have KV in the cache, status, stop rules.

Why separate: the scheduler and its tests need a sequence without a model or tokenizer. A request's
parameters are the same :class:`slimlm.engine.sampling.SamplingConfig` that ``slimlm generate`` takes
(``max_new_tokens`` = max tokens, temperature, top-k/p, seed, stop strings, ignore_eos).

Stop strings are checked incrementally: the detokenized text grows by the piece each new token adds
(:class:`slimlm.loaders.tokenizer.StreamDecoder`), and only the last ``len(piece) + longest_stop - 1``
characters can hold a new match, so each token costs the same however long the output is.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from slimlm.engine.sampling import SamplingConfig


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class StopChecker:
    """Incremental detokenizer + stop-string search. ``feed(token)`` -> index of a stop hit in
    :attr:`text` (the text is cut there) or ``None``."""

    def __init__(self, tokenizer: Any, stops: Iterable[str]):
        from slimlm.loaders.tokenizer import StreamDecoder

        self.stream = StreamDecoder(tokenizer)
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)
        self.text = ""

    def feed(self, token: int) -> int | None:
        piece = self.stream.feed(token)
        if not piece:
            return None
        lo = max(0, len(self.text) - self.longest + 1)  # a match must end inside the new piece
        self.text += piece
        hits = [i for i in (self.text.find(s, lo) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return min(hits)
        return None

    def flush(self) -> None:
        self.text += self.stream.flush()


@dataclass(eq=False)
class Sequence:
    """tokens = prompt + generated ids; ``num_computed`` of them have their KV in the cache."""

    seq_id: int
    prompt_ids: list[int]
    params: SamplingConfig
    eos_ids: frozenset[int] = frozenset()
    max_len: int | None = None  # model context: stop with "length" when reached
    stop_checker: StopChecker | None = None
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "eos" | "stop" | "length" | "abort"
    num_preemptions: int = 0
    num_cached_prompt: int = 0  # prompt tokens that came from the prefix cache (first admission)
    state: dict[str, Any] = field(default_factory=dict)  # the engine's sampling state (generator, ...)
    draft: list[int] = field(default_factory=list)  # speculative tokens to verify in the next step
    constraint: Any = None  # structured output: ``advance(token) -> True`` once the value is complete
    adapter: str | None = None  # the LoRA adapter it runs (multi-LoRA serving); None: the base model
    cache_salt: int | None = None  # its prefix-cache hash root (differs per adapter): blocks never shared across

    def __post_init__(self) -> None:
        if not self.tokens:
            self.tokens = list(self.prompt_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def output_ids(self) -> list[int]:
        return self.tokens[len(self.prompt_ids):]

    @property
    def num_output(self) -> int:
        return len(self.tokens) - len(self.prompt_ids)

    @property
    def text(self) -> str:
        return self.stop_checker.text if self.stop_checker is not None else ""

    def append(self, token: int) -> str | None:
        """Record a sampled token; return the finish reason if the sequence is done."""
        if token in self.eos_ids and not self.params.ignore_eos:
            return "eos"  # the end token is not part of the output
        self.tokens.append(token)
        if self.stop_checker is not None and self.stop_checker.feed(token) is not None:
            return "stop"
        if self.constraint is not None and self.constraint.advance(token):
            return "stop"  # the structured value (JSON, regex match) is complete
        if self.num_output >= self.params.max_new_tokens:
            return "length"
        if self.max_len is not None and self.num_tokens >= self.max_len:
            return "length"
        return None
