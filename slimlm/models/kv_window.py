"""A contiguous KV cache whose sliding-window layers keep only their window (Mistral, Gemma 3 local layers).

Why: :class:`slimlm.models.kv_cache.KVCache` keeps every layer's whole history and masks old keys
by position (exact, simple). A sliding layer never reads a key more than ``window - 1`` positions
behind its query, so this cache keeps just the newest ``window - 1`` keys for such layers (the query's
own key makes the window) and the whole history for full-attention layers: the same math, with
sliding layers' memory bounded by the window instead of the context.

Positions stay the stream's own (``length`` counts every token, as in KVCache), so keys keep the
rotation they were written with. The forward's mask covers all ``length + T`` keys; the keys a
sliding layer holds are the last ``kept + T`` of them and every dropped one is outside the window of
every query of the step, so slicing the mask's last columns gives the exact mask (padding included).

Example::

    cache = WindowKVCache.for_model(model.config, batch=1, max_len=4096, dtype=torch.float32)
    logits = model(ids, cache=cache)           # then one token at a time
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from slimlm.models.kv_cache import AttendFn, BoundedLength


class WindowKVCache(BoundedLength):
    """Per layer k/v [B, H_kv, cap, D]: cap = max_len for full layers, window - 1 for sliding ones."""

    rotates_keys = False

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 windows: Sequence[int | None], dtype: torch.dtype = torch.float32):
        if len(windows) != num_layers or any(w is not None and w < 1 for w in windows):
            raise ValueError(f"one window (>= 1, or None) per layer expected, got {list(windows)}")
        self.caps = [max_len if w is None else min(w - 1, max_len) for w in windows]
        self.k = [torch.zeros(batch, num_kv_heads, c, head_dim, dtype=dtype) for c in self.caps]
        self.v = [torch.zeros(batch, num_kv_heads, c, head_dim, dtype=dtype) for c in self.caps]
        self.windows, self.max_len, self.length = list(windows), max_len, 0

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype) -> WindowKVCache:  # type: ignore[no-untyped-def]
        windows = [config.sliding_window if config.is_sliding(i) else None for i in range(config.num_hidden_layers)]
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim, windows,
                   dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, attn: AttendFn) -> torch.Tensor:
        """k/v: [B, Hkv, T, D] at positions length .. length + T - 1."""
        self.check_room(k.shape[2])
        cap, t = self.caps[layer], k.shape[2]
        if self.windows[layer] is None:  # full attention: a plain growing cache
            end = self.length + t
            self.k[layer][:, :, self.length:end] = k
            self.v[layer][:, :, self.length:end] = v
            return attn(q, self.k[layer][:, :, :end], self.v[layer][:, :, :end], mask, is_causal)
        kept = min(self.length, cap)
        keys = torch.cat([self.k[layer][:, :, :kept], k.to(self.k[layer].dtype)], 2)  # [B, Hkv, kept + T, D]
        vals = torch.cat([self.v[layer][:, :, :kept], v.to(self.v[layer].dtype)], 2)
        if mask is not None:
            mask = mask[..., -(kept + t):]  # the dropped keys lie outside every query's window
        out = attn(q, keys, vals, mask, is_causal and kept == 0)
        m = min(cap, kept + t)
        self.k[layer][:, :, :m] = keys[:, :, kept + t - m:]
        self.v[layer][:, :, :m] = vals[:, :, kept + t - m:]
        return out

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.k + self.v)
