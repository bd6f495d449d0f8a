"""Quantized KV caches: int8 (per token and head) and 4-bit KIVI-style (keys per channel, values per token).

Why: at long contexts and many streams the KV cache, not the weights, fills memory. Both caches
answer the same ``attend`` / ``advance`` calls as :class:`slimlm.models.kv_cache.KVCache` (so any
attention layer runs unchanged): new k/v are quantized as they are written and the history is
dequantized to the model dtype before the layer's own attention core (SDPA / eager) runs, so the
math of attention is untouched and the only error is the rounding of the stored k/v.

Formats (what :attr:`nbytes` counts, all preallocated for ``max_len`` tokens like KVCache):

- **int8** (:class:`Int8KVCache`): symmetric absmax per (layer, row, kv head, token) over the head
  dimension: ``code = round(x / s)``, ``s = max|x| / 127`` stored as float16. Keys and values alike.
  Bytes per token and head: ``D + 2`` each for k and v (``head_dim = 64``: 66 vs bf16's 128, 0.52x).
- **int4** (:class:`Int4KVCache`, KIVI, Liu et al. 2024): asymmetric 4-bit codes (two per byte).
  Keys are quantized *per channel* over groups of ``group`` consecutive tokens (key outliers sit in
  fixed channels), values *per token* over the head dimension (float16 scale and zero each). The
  last ``len % group`` tokens stay in a full-precision residual buffer until their group is
  complete (KIVI's residual), so recent tokens are exact.

Example::

    cache = Int8KVCache.for_model(model.config, batch=1, max_len=2048, dtype=torch.float32)
    logits = model(ids, cache=cache)           # prefill, then decode one token at a time
    print(cache.nbytes / 2048, "bytes per token")
"""

from __future__ import annotations

import torch

from slimlm.models.kv_cache import AttendFn, BoundedLength


def quant_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [..., D] -> (codes int8 [..., D], scale float16 [..., 1]) with ``x ~= codes * scale``."""
    s = (x.detach().abs().amax(-1, keepdim=True).float() / 127.0).clamp(min=1e-6).to(torch.float16)
    q = torch.round(x.float() / s.float()).clamp(-127, 127).to(torch.int8)
    return q, s


def dequant_int8(q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * s.float()).to(dtype)


def quant_int4(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit over ``dim``: (codes uint8 in 0..15, same shape as x; scale, zero float16 with
    ``dim`` kept as size 1) with ``x ~= codes * scale + zero``."""
    xf = x.detach().float()
    lo, hi = xf.amin(dim, keepdim=True), xf.amax(dim, keepdim=True)
    s = ((hi - lo) / 15.0).clamp(min=1e-6).to(torch.float16)
    z = lo.to(torch.float16)
    q = torch.round((xf - z.float()) / s.float()).clamp(0, 15).to(torch.uint8)
    return q, s, z


def pack4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes 0..15 [..., D] (D even) -> [..., D / 2], two codes per byte (low nibble first)."""
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack4(p: torch.Tensor) -> torch.Tensor:
    """[..., D / 2] -> uint8 codes [..., D]."""
    return torch.stack([p & 0xF, p >> 4], -1).flatten(-2)


class Int8KVCache(BoundedLength):
    """codes k/v: int8 [layers, B, H_kv, T_max, D]; scales float16 [layers, B, H_kv, T_max, 1]."""

    rotates_keys = False

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32):
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=torch.int8)
        self.v = torch.zeros(shape, dtype=torch.int8)
        self.ks = torch.zeros(shape[:-1] + (1,), dtype=torch.float16)
        self.vs = torch.zeros(shape[:-1] + (1,), dtype=torch.float16)
        self.dtype, self.max_len, self.length = dtype, max_len, 0

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype) -> Int8KVCache:  # type: ignore[no-untyped-def]
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim, dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, attn: AttendFn) -> torch.Tensor:
        """Quantize and store k/v ``[B, H_kv, T, D]``, attend over the dequantized history."""
        start, t = self.length, k.shape[2]
        end = start + t
        self.check_room(t)
        self.k[layer, :, :, start:end], self.ks[layer, :, :, start:end] = quant_int8(k)
        self.v[layer, :, :, start:end], self.vs[layer, :, :, start:end] = quant_int8(v)
        kd = dequant_int8(self.k[layer, :, :, :end], self.ks[layer, :, :, :end], self.dtype)  # [B, Hkv, S, D]
        vd = dequant_int8(self.v[layer, :, :, :end], self.vs[layer, :, :, :end], self.dtype)
        return attn(q, kd.to(q.dtype), vd.to(q.dtype), mask, is_causal)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in (self.k, self.v, self.ks, self.vs))


class Int4KVCache(BoundedLength):
    """KIVI 4-bit cache. Packed codes k/v: uint8 [layers, B, H_kv, T_max, D / 2]; key scale/zero
    float16 [layers, B, H_kv, T_max / group, D] (per channel, per token group); value scale/zero
    float16 [layers, B, H_kv, T_max, 1] (per token); full-precision residual k/v
    [layers, B, H_kv, group, D] for the ``length % group`` newest tokens."""

    rotates_keys = False

    def __init__(self, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, group: int = 32):
        if head_dim % 2 or group < 1:
            raise ValueError(f"int4 KV needs an even head_dim and group >= 1 (got {head_dim}, {group})")
        groups = -(-max_len // group)
        base = (num_layers, batch, num_kv_heads)
        self.k = torch.zeros(base + (groups * group, head_dim // 2), dtype=torch.uint8)
        self.v = torch.zeros(base + (groups * group, head_dim // 2), dtype=torch.uint8)
        self.ks = torch.zeros(base + (groups, head_dim), dtype=torch.float16)
        self.kz = torch.zeros(base + (groups, head_dim), dtype=torch.float16)
        self.vs = torch.zeros(base + (groups * group, 1), dtype=torch.float16)
        self.vz = torch.zeros(base + (groups * group, 1), dtype=torch.float16)
        self.rk = torch.zeros(base + (group, head_dim), dtype=dtype)  # residual (not yet a full group)
        self.rv = torch.zeros(base + (group, head_dim), dtype=dtype)
        self.dtype, self.max_len, self.group, self.length = dtype, max_len, group, 0

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype, group: int = 32) -> Int4KVCache:  # type: ignore[no-untyped-def]
        return cls(config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim, dtype, group)

    def _store(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Quantize whole groups k/v ``[B, Hkv, n * group, D]`` into token slots from ``start``."""
        b, h, n, d = k.shape
        g = self.group
        kg = k.reshape(b, h, n // g, g, d)
        qk, sk, zk = quant_int4(kg, dim=3)  # codes [B, H, n/g, g, D]; scale/zero [B, H, n/g, 1, D]
        self.k[layer, :, :, start:start + n] = pack4(qk.reshape(b, h, n, d))
        self.ks[layer, :, :, start // g:(start + n) // g] = sk[:, :, :, 0]
        self.kz[layer, :, :, start // g:(start + n) // g] = zk[:, :, :, 0]
        qv, sv, zv = quant_int4(v, dim=3)  # per token: scale/zero [B, H, n, 1]
        self.v[layer, :, :, start:start + n] = pack4(qv)
        self.vs[layer, :, :, start:start + n], self.vz[layer, :, :, start:start + n] = sv, zv

    def _load(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` (a multiple of ``group``) quantized tokens, dequantized: [B, Hkv, n, D]."""
        g = self.group
        qk = unpack4(self.k[layer, :, :, :n]).float()  # [B, H, n, D]
        b, h, _, d = qk.shape
        sk = self.ks[layer, :, :, :n // g].float().repeat_interleave(g, 2)  # [B, H, n, D]
        zk = self.kz[layer, :, :, :n // g].float().repeat_interleave(g, 2)
        kd = qk * sk + zk
        vd = unpack4(self.v[layer, :, :, :n]).float() * self.vs[layer, :, :, :n].float() + self.vz[layer, :, :, :n].float()
        return kd.to(self.dtype), vd.to(self.dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, attn: AttendFn) -> torch.Tensor:
        """Append k/v ``[B, H_kv, T, D]``: complete groups are quantized, the rest stays residual."""
        self.check_room(k.shape[2])
        g = self.group
        qlen = self.length - self.length % g  # quantized tokens before this step
        r = self.length - qlen
        allk = torch.cat([self.rk[layer, :, :, :r], k.to(self.dtype)], 2)  # [B, H, r + T, D]
        allv = torch.cat([self.rv[layer, :, :, :r], v.to(self.dtype)], 2)
        full = allk.shape[2] - allk.shape[2] % g
        if full:
            self._store(layer, qlen, allk[:, :, :full], allv[:, :, :full])
        rest = allk.shape[2] - full
        self.rk[layer, :, :, :rest] = allk[:, :, full:]
        self.rv[layer, :, :, :rest] = allv[:, :, full:]
        kd, vd = self._load(layer, qlen + full)
        kd = torch.cat([kd, allk[:, :, full:]], 2)  # [B, Hkv, S, D]
        vd = torch.cat([vd, allv[:, :, full:]], 2)
        return attn(q, kd.to(q.dtype), vd.to(q.dtype), mask, is_causal)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size()
                   for x in (self.k, self.v, self.ks, self.kz, self.vs, self.vz, self.rk, self.rv))
