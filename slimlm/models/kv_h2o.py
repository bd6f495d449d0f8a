"""Heavy-hitter eviction (H2O, Zhang et al. 2023): keep the ``recent`` newest keys plus the ``heavy``
keys that received the most attention so far, per layer, row and kv head.

Why: most attention mass lands on few tokens; keeping those and a recent window bounds KV memory at
``heavy + recent`` tokens with a smaller quality loss than a plain window.

How: each step attends to the kept keys plus its own (causal), through the layer's own attention
core. The cache also computes the softmax of ``q k^T * scale`` (``scale`` = the model's attention
scale; soft-capping is not applied: the scores only rank keys) and adds each key's attention,
summed over the query heads of its kv group and the step's queries, to that key's running score.
When more than ``heavy + recent`` keys are held, the ones outside the newest ``recent`` with the
lowest scores are evicted. Keys keep their RoPE rotation at their real positions (H2O does not
re-assign positions), so a stream stays within the model's context. Rows must be unpadded and
layers full-attention (the forward's mask is replaced by the cache's own: kept keys visible, the
step's tokens causal).

Example::

    cache = H2OKVCache.for_model(model.config, batch=1, heavy=128, recent=128, dtype=torch.float32)
"""

from __future__ import annotations

import torch

from slimlm.models.kv_cache import AttendFn


class H2OKVCache:
    """k/v: [layers, B, H_kv, heavy + recent, D]; score: float32 and pos: int64 [layers, B, H_kv, cap]."""

    rotates_keys = False

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, heavy: int, recent: int,
                 scale: float, dtype: torch.dtype = torch.float32):
        if heavy < 0 or recent < 1:
            raise ValueError(f"h2o needs heavy >= 0 and recent >= 1 (got {heavy}, {recent})")
        cap = heavy + recent
        self.k = torch.zeros(num_layers, batch, num_kv_heads, cap, head_dim, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.score = torch.zeros(num_layers, batch, num_kv_heads, cap)
        self.pos = torch.zeros(num_layers, batch, num_kv_heads, cap, dtype=torch.long)
        self.heavy, self.recent, self.capacity, self.scale = heavy, recent, cap, scale
        self.length = 0  # tokens of the stream (positions are the real ones)
        self.held = 0  # keys held per (layer, row, head)

    @classmethod
    def for_model(cls, config, batch: int, heavy: int, recent: int, dtype: torch.dtype) -> H2OKVCache:  # type: ignore[no-untyped-def]
        if any(config.is_sliding(i) for i in range(config.num_hidden_layers)):
            raise ValueError("h2o eviction is for full-attention layers (this model has sliding-window layers)")
        scale = config.attn_scale if config.attn_scale is not None else config.head_dim**-0.5
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim, heavy, recent,
                   scale, dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, attn: AttendFn) -> torch.Tensor:
        """q: [B, H, T, D]; k/v: [B, Hkv, T, D] at positions length .. length + T - 1."""
        n, t = self.held, k.shape[2]
        b, hkv = k.shape[0], k.shape[1]
        keys = torch.cat([self.k[layer, :, :, :n], k.to(self.k.dtype)], 2)  # [B, Hkv, S, D], S = n + T
        vals = torch.cat([self.v[layer, :, :, :n], v.to(self.v.dtype)], 2)
        s = n + t
        own = None  # kept keys all visible, the step's own tokens causal: [T, S] (None: SDPA's causal flag)
        if t > 1 and n > 0:
            own = torch.ones(t, s, dtype=torch.bool)
            own[:, n:] = torch.ones(t, t, dtype=torch.bool).tril()
        out = attn(q, keys.to(q.dtype), vals.to(q.dtype), None if own is None else own.view(1, 1, t, s),
                   own is None and t > 1)
        # attention each key received (ranking only): [B, Hkv, g, T, S] -> summed over g and T
        g = q.shape[1] // hkv
        logits = torch.einsum("bhgtd,bhsd->bhgts", q.float().view(b, hkv, g, t, -1), keys.float()) * self.scale
        if t > 1:
            causal = own if own is not None else torch.ones(t, s, dtype=torch.bool).tril()
            logits = logits.masked_fill(~causal, float("-inf"))
        got = logits.softmax(-1).sum((2, 3))  # [B, Hkv, S]
        score = torch.cat([self.score[layer, :, :, :n], torch.zeros(b, hkv, t)], 2) + got
        pos = torch.cat([self.pos[layer, :, :, :n], torch.arange(self.length, self.length + t).expand(b, hkv, t)], 2)
        if s > self.capacity:  # keep the newest `recent` and the `heavy` best-scored of the rest, in order
            rank = score.masked_fill(pos >= self.length + t - self.recent, float("inf"))
            keep = rank.topk(self.capacity, -1).indices.sort(-1).values  # [B, Hkv, cap]
            keys = keys.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, keys.shape[-1]))
            vals = vals.gather(2, keep.unsqueeze(-1).expand(-1, -1, -1, vals.shape[-1]))
            score, pos = score.gather(2, keep), pos.gather(2, keep)
        m = keys.shape[2]
        self.k[layer, :, :, :m], self.v[layer, :, :, :m] = keys, vals
        self.score[layer, :, :, :m], self.pos[layer, :, :, :m] = score, pos
        return out

    def check_room(self, t: int) -> None:
        """Old keys are evicted; positions are real, so the model's context still bounds the stream."""

    def advance(self, t: int) -> None:
        self.length += t
        self.held = min(self.held + t, self.capacity)

    def reset(self) -> None:
        self.length = self.held = 0

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.k, self.v, self.score, self.pos))
