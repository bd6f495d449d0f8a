"""Paged KV cache: K/V tensors addressed through block tables, one ragged batch per forward.

Why: the serving engine runs many sequences of different lengths in one forward without padding.
The step's new tokens of every sequence are flattened into one row ``[1, N]`` (a decode contributes
1 token, a prefill chunk many), so every linear sees one ``[N, D]`` GEMM. Attention is the only
per-sequence part: :meth:`PagedKVCache.attend` (the same call the contiguous
:class:`slimlm.models.kv_cache.KVCache` answers) writes the new k/v into their slots, then runs the
layer's own attention core (SDPA / soft-capped eager) on each sequence's history, gathered from its
blocks. All decodes of a step form one padded ``[B, H, 1, S_max]`` attention call (keys past a
sequence's length masked out); each prefill chunk runs alone with a bottom-right causal mask (and the
layer's sliding window), or SDPA's causal flag for a fresh prompt, as the contiguous cache does.

Layout: ``k, v: [layers, num_blocks, block_size, H_kv, D]``; token ``p`` of a sequence with block
table ``tbl`` lives in slot ``tbl[p // bs] * bs + p % bs`` of the flattened ``[num_blocks * bs, H_kv, D]``
view. Block ids come from :class:`slimlm.engine.block_pool.KVCacheManager`.

The C++ decode kernels (``attn_decode`` / ``decode_layer``) read one contiguous cache with one shared
length, so layers fall back to the torch path with this cache (see docs/serving.md for what the
kernels need to read block tables).

Example (what :class:`slimlm.engine.runner.ModelRunner` does per step)::

    cache = PagedKVCache.for_model(model.config, num_blocks=64, block_size=16, dtype=torch.float32)
    cache.set_batch([(table_a, 0, 5), (table_b, 7, 1)])  # a's 5-token prompt, b's 8th token
    ctx = AttnContext(rope=model.rope_tables(positions), masks={}, is_causal=False, cache=cache)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from slimlm.models.kv_cache import AttendFn
from slimlm.models.kv_quant import dequant_int8, quant_int8


@dataclass
class _Prefill:
    """One sequence's chunk of ``n`` tokens at flat offsets ``[off, off + n)``, history ``start``."""

    off: int
    n: int
    start: int
    gather: torch.Tensor | None  # slots of keys 0 .. start + n - 1, None for a fresh prompt: [start + n]


class PagedKVCache:
    """k, v: [layers, num_blocks, block_size, H_kv, D]; ``set_batch`` before each forward."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, windows: Sequence[int | None] | None = None):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype)
        self.v = torch.zeros(shape, dtype=dtype)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.windows = list(windows) if windows is not None else [None] * num_layers  # sliding window per layer
        self.length = 0  # no history shared by all rows (each sequence has its own)
        self._slots = torch.zeros(0, dtype=torch.long)
        self._prefills: list[_Prefill] = []
        self._dec_tokens = torch.zeros(0, dtype=torch.long)  # flat offsets of the decode tokens: [Bd]
        self._dec_gather = torch.zeros(0, 0, dtype=torch.long)  # [Bd, S_max]
        self._dec_len = torch.zeros(0, dtype=torch.long)  # [Bd] keys per decode (its new token included)
        self._dec_masks: dict[int | None, torch.Tensor | None] = {}
        self._dec_in_order = False

    @classmethod
    def for_model(cls, config, num_blocks: int, block_size: int, dtype: torch.dtype) -> PagedKVCache:  # type: ignore[no-untyped-def]
        windows = [config.sliding_window if config.is_sliding(i) else None for i in range(config.num_hidden_layers)]
        return cls(config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim,
                   dtype, windows)

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def bytes_per_block(self) -> int:
        return self.nbytes // self.num_blocks

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        """Copy-on-write: block ``src`` -> ``dst`` in every layer (before the forward writes)."""
        if copies:
            src = torch.tensor([c[0] for c in copies], dtype=torch.long)
            dst = torch.tensor([c[1] for c in copies], dtype=torch.long)
            self.k[:, dst] = self.k[:, src]
            self.v[:, dst] = self.v[:, src]

    def _slots_of(self, table: Sequence[int], start: int, end: int) -> torch.Tensor:
        bs = self.block_size
        pos = torch.arange(start, end)
        tbl = torch.as_tensor(table, dtype=torch.long)
        return tbl[pos // bs] * bs + pos % bs  # type: ignore[no-any-return]

    def set_batch(self, seqs: Sequence[tuple[Sequence[int], int, int]]) -> None:
        """The step's layout: per sequence (block table, tokens already cached, new tokens), in the
        order their tokens appear in the flattened input row."""
        slots, dec_tokens, dec_gather, dec_len = [], [], [], []
        self._prefills = []
        off = 0
        for table, start, n in seqs:
            if n < 1 or len(table) * self.block_size < start + n:
                raise ValueError(f"bad batch entry: {n} tokens at {start} with {len(table)} blocks")
            slots.append(self._slots_of(table, start, start + n))
            if n == 1:
                dec_tokens.append(off)
                dec_gather.append(self._slots_of(table, 0, start + 1))
                dec_len.append(start + 1)
            else:
                gather = self._slots_of(table, 0, start + n) if start > 0 else None
                self._prefills.append(_Prefill(off, n, start, gather))
            off += n
        self._slots = torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)
        self._dec_tokens = torch.tensor(dec_tokens, dtype=torch.long)
        self._dec_in_order = dec_tokens == list(range(off))
        self._dec_masks = {}
        if dec_tokens:
            s_max = max(dec_len)
            self._dec_len = torch.tensor(dec_len, dtype=torch.long)
            self._dec_gather = torch.stack([torch.nn.functional.pad(g, (0, s_max - len(g))) for g in dec_gather])
            for w in set(self.windows):
                self._dec_masks[w] = self._decode_mask(w)

    def _decode_mask(self, window: int | None) -> torch.Tensor | None:
        """bool [Bd, 1, 1, S_max]: key j visible to a decode at position len-1 (None = all visible)."""
        lens = self._dec_len
        s_max = self._dec_gather.shape[1]
        if window is None and bool((lens == s_max).all()):
            return None
        j = torch.arange(s_max).unsqueeze(0)  # [1, S]
        m = j < lens.unsqueeze(1)
        if window is not None:
            m = m & ((lens.unsqueeze(1) - 1 - j) < window)
        return m.view(len(lens), 1, 1, s_max)

    @staticmethod
    def _prefill_mask(start: int, n: int, window: int | None) -> torch.Tensor | None:
        """bool [1, 1, n, start + n] (bottom-right causal, window), or None for SDPA's causal flag."""
        s = start + n
        if start == 0 and (window is None or s <= window):
            return None
        q = torch.arange(start, s).unsqueeze(1)
        k = torch.arange(s).unsqueeze(0)
        m = k <= q
        if window is not None:
            m = m & (q - k < window)
        return m.view(1, 1, n, s)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, attn: AttendFn) -> torch.Tensor:
        """q: [1, H, N, D], k/v: [1, Hkv, N, D] for the flattened step -> [1, H, N, D].

        ``mask`` / ``is_causal`` of the forward are ignored: each sequence's mask follows from its
        own length (and this layer's window)."""
        if q.shape[0] != 1 or q.shape[2] != self._slots.numel():
            raise ValueError(f"paged attention expects [1, H, {self._slots.numel()}, D] queries, got {tuple(q.shape)}")
        self._store(layer, k[0].transpose(0, 1), v[0].transpose(0, 1))
        window = self.windows[layer]
        bd = self._dec_tokens.numel()
        if bd and self._dec_in_order:  # only decodes: one padded attention call, no scatter
            return self._decode(layer, q[0].transpose(0, 1).unsqueeze(2), window, attn).transpose(0, 2)
        out = torch.empty_like(q)
        if bd:
            qd = q[0, :, self._dec_tokens].transpose(0, 1).unsqueeze(2)  # [Bd, H, 1, D]
            out[0, :, self._dec_tokens] = self._decode(layer, qd, window, attn)[:, :, 0].transpose(0, 1)
        for p in self._prefills:
            qi = q[:, :, p.off:p.off + p.n]  # [1, H, n, D]
            if p.gather is None:  # fresh prompt: its keys are this step's
                ki, vi = k[:, :, p.off:p.off + p.n], v[:, :, p.off:p.off + p.n]
            else:
                ki, vi = self._read(layer, p.gather, q.dtype)  # [start + n, Hkv, D]
                ki, vi = ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0)  # [1, Hkv, start + n, D]
            m = self._prefill_mask(p.start, p.n, window)
            out[:, :, p.off:p.off + p.n] = attn(qi, ki, vi, m, m is None)
        return out

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write the step's k/v ``[N, Hkv, D]`` into their slots (a quantized cache encodes here)."""
        hkv, d = self.num_kv_heads, self.head_dim
        self.k[layer].view(-1, hkv, d).index_copy_(0, self._slots, k.to(self.k.dtype))
        self.v[layer].view(-1, hkv, d).index_copy_(0, self._slots, v.to(self.v.dtype))

    def _read(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """k/v of ``slots`` (any shape ``[...]``) -> ``[..., Hkv, D]`` in ``dtype`` (decoded if quantized)."""
        hkv, d = self.num_kv_heads, self.head_dim
        return self.k[layer].view(-1, hkv, d)[slots].to(dtype), self.v[layer].view(-1, hkv, d)[slots].to(dtype)

    def _decode(self, layer: int, qd: torch.Tensor, window: int | None, attn: AttendFn) -> torch.Tensor:
        """qd: [Bd, H, 1, D] -> [Bd, H, 1, D] over each decode's gathered history."""
        kd, vd = self._read(layer, self._dec_gather, qd.dtype)  # [Bd, S_max, Hkv, D]
        return attn(qd, kd.transpose(1, 2), vd.transpose(1, 2), self._dec_masks[window], False)


class Int8PagedKVCache(PagedKVCache):
    """The paged cache with int8 k/v and a float16 scale per (token, kv head): the format of
    :class:`slimlm.models.kv_quant.Int8KVCache` (``D + 2`` bytes per token and head for k and for v).

    codes k, v: int8 [layers, num_blocks, block_size, H_kv, D]; scales ks, vs: float16 [..., H_kv, 1].
    A fresh prompt's own attention uses its exact k/v (they are stored quantized); every later read
    decodes the stored codes."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, windows: Sequence[int | None] | None = None):
        super().__init__(num_layers, 1, 1, num_kv_heads, head_dim, dtype, windows)
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=torch.int8)
        self.v = torch.zeros(shape, dtype=torch.int8)
        self.ks = torch.zeros(shape[:-1] + (1,), dtype=torch.float16)
        self.vs = torch.zeros(shape[:-1] + (1,), dtype=torch.float16)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int) -> int:
        return 2 * num_layers * num_kv_heads * (head_dim + 2)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.k, self.v, self.ks, self.vs))

    def copy_blocks(self, copies: Sequence[tuple[int, int]]) -> None:
        if copies:
            src = torch.tensor([c[0] for c in copies], dtype=torch.long)
            dst = torch.tensor([c[1] for c in copies], dtype=torch.long)
            for x in (self.k, self.v, self.ks, self.vs):
                x[:, dst] = x[:, src]

    def _store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        hkv, d = self.num_kv_heads, self.head_dim
        for codes, scales, x in ((self.k, self.ks, k), (self.v, self.vs, v)):
            q, s = quant_int8(x)
            codes[layer].view(-1, hkv, d).index_copy_(0, self._slots, q)
            scales[layer].view(-1, hkv, 1).index_copy_(0, self._slots, s)

    def _read(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        hkv, d = self.num_kv_heads, self.head_dim
        return tuple(dequant_int8(codes[layer].view(-1, hkv, d)[slots], scales[layer].view(-1, hkv, 1)[slots], dtype)
                     for codes, scales in ((self.k, self.ks), (self.v, self.vs)))  # type: ignore[return-value]
