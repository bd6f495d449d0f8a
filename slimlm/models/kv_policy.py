"""KV cache policies: one typed config names how a stream's keys/values are kept; ``make_cache`` builds it.

Policies (the ``--kv-policy`` spelling in ``slimlm eval`` / ``generate`` / ``serve``):

- ``full``: every key/value in the model dtype (:class:`slimlm.models.kv_cache.KVCache`).
- ``window``: sliding-window layers (Mistral, Gemma 3 local layers) keep only their window, full
  layers everything; the same math as ``full`` (:class:`slimlm.models.kv_window.WindowKVCache`).
- ``int8``: int8 codes with a float16 scale per token and kv head (:class:`slimlm.models.kv_quant.Int8KVCache`).
- ``int4`` or ``int4:GROUP``: KIVI 4-bit, keys per channel over GROUP-token groups (default 32),
  values per token, the unfinished group kept exact (:class:`slimlm.models.kv_quant.Int4KVCache`).
- ``streaming:SINKS:WINDOW``: StreamingLLM, the first SINKS tokens + the newest WINDOW, positions
  assigned within the cache, constant memory (:class:`slimlm.models.kv_streaming.StreamingKVCache`).
- ``h2o:HEAVY:RECENT``: heavy-hitter eviction, the RECENT newest keys + the HEAVY most-attended ones
  per kv head, real positions (:class:`slimlm.models.kv_h2o.H2OKVCache`).

Example::

    policy = KVPolicy.parse("streaming:4:1020")
    cache = make_cache(policy, model, batch=1, max_len=4096)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from slimlm.models.kv_cache import KVCache, SequenceCache
from slimlm.utils.config import BaseConfig, register_config
from slimlm.utils.errors import ConfigError

METHODS = ("full", "window", "int8", "int4", "streaming", "h2o")
SPELLING = "full, window, int8, int4[:GROUP], streaming:SINKS:WINDOW or h2o:HEAVY:RECENT"


@register_config
@dataclass
class KVPolicy(BaseConfig):
    kind: ClassVar[str] = "kv_policy"
    method: str = field(default="full", metadata={"help": "full | window | int8 | int4 | streaming | h2o"})
    group: int = field(default=32, metadata={"min": 2, "help": "int4: tokens per key-quantization group"})
    sinks: int = field(default=4, metadata={"min": 0, "help": "streaming: attention-sink tokens kept"})
    window: int = field(default=1020, metadata={"min": 1, "help": "streaming / h2o: most recent tokens kept"})
    heavy: int = field(default=0, metadata={"min": 0, "help": "h2o: most-attended older tokens kept"})

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown KV policy {self.method!r}; use {SPELLING}")

    @classmethod
    def parse(cls, text: str) -> KVPolicy:
        """``full`` | ``int8`` | ``int4[:GROUP]`` | ``streaming:SINKS:WINDOW`` (one-line ConfigError otherwise)."""
        parts = str(text).strip().lower().split(":")
        method, args = parts[0], parts[1:]
        try:
            nums = [int(a) for a in args]
        except ValueError:
            raise ConfigError(f"bad KV policy {text!r}: use {SPELLING}") from None
        if method in ("full", "window", "int8") and not nums:
            return cls(method=method)
        if method == "int4" and len(nums) <= 1:
            return cls(method=method, group=nums[0] if nums else 32)
        if method == "streaming" and len(nums) == 2:
            return cls(method=method, sinks=nums[0], window=nums[1])
        if method == "h2o" and len(nums) == 2:
            return cls(method=method, heavy=nums[0], window=nums[1])
        raise ConfigError(f"bad KV policy {text!r}: use {SPELLING}")

    def __str__(self) -> str:
        if self.method == "int4":
            return f"int4:{self.group}"
        if self.method == "streaming":
            return f"streaming:{self.sinks}:{self.window}"
        if self.method == "h2o":
            return f"h2o:{self.heavy}:{self.window}"
        return self.method

    @property
    def bounded(self) -> bool:
        """Whether the cache holds a fixed number of tokens however long the stream (streaming)."""
        return self.method == "streaming"

    @property
    def evicts(self) -> bool:
        """Whether old keys are dropped (streaming, h2o): perplexity is then measured on one stream."""
        return self.method in ("streaming", "h2o")


def make_cache(policy: KVPolicy | str, model, batch: int, max_len: int,  # type: ignore[no-untyped-def]
               dtype: torch.dtype | None = None) -> SequenceCache:
    """The cache of ``policy`` for ``model`` (a :class:`slimlm.models.transformer.Transformer`):
    ``batch`` rows of up to ``max_len`` tokens (a streaming cache ignores ``max_len``)."""
    from slimlm.models.kv_h2o import H2OKVCache
    from slimlm.models.kv_quant import Int4KVCache, Int8KVCache
    from slimlm.models.kv_streaming import StreamingKVCache
    from slimlm.models.kv_window import WindowKVCache

    p = KVPolicy.parse(policy) if isinstance(policy, str) else policy
    cfg, dt = model.config, dtype or model.dtype
    if p.method == "int8":
        return Int8KVCache.for_model(cfg, batch, max_len, dt)
    if p.method == "int4":
        if cfg.head_dim % 2:
            raise ConfigError(f"int4 KV needs an even head_dim (the model's is {cfg.head_dim})")
        return Int4KVCache.for_model(cfg, batch, max_len, dt, p.group)
    if p.method == "window":
        return WindowKVCache.for_model(cfg, batch, max_len, dt)
    if p.method == "h2o":
        try:
            return H2OKVCache.for_model(cfg, batch, p.heavy, p.window, dt)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if p.method == "streaming":
        return StreamingKVCache.for_model(cfg, batch, p.sinks, p.window, dt, model.rope_tables)
    return KVCache.for_model(cfg, batch, max_len, dt)
