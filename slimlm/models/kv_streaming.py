"""StreamingLLM cache (Xiao et al. 2024): ``sinks`` first tokens + the ``window`` most recent ones.

Why: a stream longer than the model's context (or than memory) keeps constant KV memory; keeping the
first few tokens (attention sinks) is what keeps perplexity flat where a plain sliding window
collapses.

Positions are assigned *within the cache*, as the paper does: the kept keys sit at positions
``0 .. S - 1`` in cache order (sinks first, then the window), and the new tokens of a step continue at
``length .. length + T - 1`` (:attr:`length` = keys held, which is where the forward's default
positions count from). So no position ever exceeds ``sinks + window + T``, far inside the trained
context, however long the stream. Because a key's position changes every time an older window key is
evicted, keys are stored **before RoPE** (``rotates_keys = True``: attention hands the cache
un-rotated keys and rotates only the queries) and rotated here at their current positions at every
step, from the model's own rotary tables (``rope_tables``: :meth:`Transformer.rope_tables`), so
there is no re-rotation drift. Models without RoPE (learned positions) just see in-cache positions.

A step of ``T`` tokens attends to the kept keys plus its own (causal), then the cache keeps the sinks
and the newest ``window``. With ``T = 1`` this is StreamingLLM exactly; a chunk of ``T`` lets each of
its queries see up to ``T - 1`` keys beyond the window (chunked streaming). Memory held is
``sinks + window`` tokens per layer whatever the stream length (:attr:`nbytes`); a step's own k/v are
a temporary like any activation. Rows of a batch must be unpadded (they share positions).

Example::

    cache = StreamingKVCache.for_model(model.config, 1, sinks=4, window=1020, dtype=model.dtype,
                                       rope_tables=model.rope_tables)
    for chunk in ids.split(1, dim=1):          # any length: memory stays constant
        logits = model(chunk, cache=cache)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from slimlm.models.kv_cache import AttendFn
from slimlm.models.rope import apply_rotary

# positions [B, T] -> layer type -> (cos, sin) [B, T, 1, D] (empty without RoPE)
RopeTables = Callable[[torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]


class StreamingKVCache:
    """k (pre-RoPE), v: [layers, B, H_kv, sinks + window, D]; the first ``length`` slots are held."""

    rotates_keys = True

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, sinks: int, window: int,
                 dtype: torch.dtype = torch.float32, rope_tables: RopeTables | None = None,
                 layer_types: Sequence[str] | None = None):
        if sinks < 0 or window < 1:
            raise ValueError(f"streaming cache needs sinks >= 0 and window >= 1 (got {sinks}, {window})")
        shape = (num_layers, batch, num_kv_heads, sinks + window, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.sinks, self.window, self.capacity = sinks, window, sinks + window
        self.rope_tables = rope_tables
        self.layer_types = list(layer_types) if layer_types else ["full_attention"] * num_layers
        self.length = 0  # keys held (<= capacity)
        self.seen = 0  # tokens the stream has carried so far
        self._tables: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    @classmethod
    def for_model(cls, config, batch: int, sinks: int, window: int, dtype: torch.dtype,  # type: ignore[no-untyped-def]
                  rope_tables: RopeTables | None = None) -> StreamingKVCache:
        types = config.layer_types or ["full_attention"] * config.num_hidden_layers
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim, sinks, window,
                   dtype, rope_tables, types)

    def _rotate(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """k: [B, Hkv, S, D] pre-RoPE -> rotated at positions 0 .. S - 1 (this layer type's tables)."""
        if self.rope_tables is None:
            return k
        s = k.shape[2]
        tables = self._tables.get(s)
        if tables is None:  # once per step: every layer of the step has the same S
            tables = self.rope_tables(torch.arange(s).unsqueeze(0))
            self._tables = {s: tables}
        rope = tables.get(self.layer_types[layer])
        if rope is None:
            return k
        cos, sin = rope  # [1, S, 1, D]
        return apply_rotary(k.transpose(1, 2), cos.to(k.dtype), sin.to(k.dtype)).transpose(1, 2)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, attn: AttendFn) -> torch.Tensor:
        """q: [B, H, T, D] rotated at positions length..; k (pre-RoPE) / v: [B, Hkv, T, D]."""
        n, t = self.length, k.shape[2]
        keys = torch.cat([self.k[layer, :, :, :n], k.to(self.k.dtype)], 2)  # [B, Hkv, n + T, D]
        vals = torch.cat([self.v[layer, :, :, :n], v.to(self.v.dtype)], 2)
        out = attn(q, self._rotate(layer, keys).to(q.dtype), vals.to(q.dtype), mask, is_causal)
        total = n + t
        if total <= self.capacity:
            self.k[layer, :, :, n:total] = keys[:, :, n:]
            self.v[layer, :, :, n:total] = vals[:, :, n:]
        else:  # keep the sinks and the newest window (keys re-rotate at their new slots next step)
            s, w = self.sinks, self.window
            self.k[layer, :, :, s:] = keys[:, :, total - w:]
            self.v[layer, :, :, s:] = vals[:, :, total - w:]
            if n < s:  # the sinks themselves arrived in this step
                self.k[layer, :, :, n:s] = keys[:, :, n:s]
                self.v[layer, :, :, n:s] = vals[:, :, n:s]
        return out

    def check_room(self, t: int) -> None:
        """A stream never runs out of room (old window keys are evicted)."""

    def advance(self, t: int) -> None:
        self.seen += t
        self.length = min(self.length + t, self.capacity)

    def reset(self) -> None:
        self.length = self.seen = 0
        self._tables = {}

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
