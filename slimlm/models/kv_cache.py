"""Preallocated KV cache: the object attention reads and writes through.

All rows of a batch share one write position (``length``); ragged batches are left-padded and the
padding is masked, so a cache step is one slice copy per layer. Sliding-window layers keep the whole
history and mask by position (simple and exact). The serving engine's paged cache
(:class:`slimlm.engine.paged_cache.PagedKVCache`) offers the same :meth:`KVCache.attend`, so
attention layers run unchanged with either; only the C++ decode fast path needs this contiguous kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

# attention core of a layer: (q [B, H, T, D], k/v [B, Hkv, S, D], mask bool [B|1, 1, T, S] | None,
# is_causal) -> [B, H, T, D]
AttendFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool], torch.Tensor]


class AttentionCache(Protocol):
    """What attention needs from a cache: store this step's k/v and attend over the history.

    A cache may also set ``rotates_keys = True`` (StreamingLLM, :mod:`slimlm.models.kv_streaming`):
    attention then hands it the keys *before* RoPE (queries are still rotated at the forward's
    positions) and the cache rotates the keys it keeps at the positions it assigns them.
    """

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, attn: AttendFn) -> torch.Tensor: ...


class SequenceCache(AttentionCache, Protocol):
    """A cache a whole-model forward drives (:meth:`slimlm.models.transformer.Transformer.forward`).

    ``length`` is where the next token's position counts from (the forward's default positions are
    ``length .. length + T - 1``) and the number of keys its masks cover before this step; the
    forward calls ``advance(T)`` once after every layer attended. :class:`KVCache`, the quantized
    caches (:mod:`slimlm.models.kv_quant`) and the streaming cache answer it."""

    length: int

    def check_room(self, t: int) -> None: ...

    def advance(self, t: int) -> None: ...

    def reset(self) -> None: ...

    @property
    def nbytes(self) -> int: ...


class BoundedLength:
    """The token count of a fixed-capacity cache (``length`` / ``max_len`` set by the subclass): the room
    check, the once-per-forward advance and the reset that every contiguous cache policy shares."""

    length: int
    max_len: int

    def check_room(self, t: int) -> None:
        """Raise if ``t`` more tokens do not fit."""
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length + t} tokens > capacity {self.max_len}")

    def advance(self, t: int) -> None:
        """Called once per forward after every layer wrote ``t`` new tokens."""
        self.length += t

    def reset(self) -> None:
        self.length = 0


class KVCache(BoundedLength):
    """k, v: [layers, B, H_kv, T_max, D]."""

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # tokens already stored (same for every row)

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype) -> KVCache:  # type: ignore[no-untyped-def]
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim, dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v ``[B, H_kv, T, D]`` at the current position; return all keys/values so far."""
        start, t = self.length, k.shape[2]
        end = start + t
        self.check_room(t)
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, attn: AttendFn) -> torch.Tensor:
        """Write k/v ``[B, H_kv, T, D]``, then ``attn`` over every key so far with the forward's mask."""
        k, v = self.update(layer, k, v)  # [B, Hkv, S, D]
        return attn(q, k, v, mask, is_causal)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
