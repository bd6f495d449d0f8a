"""Rotary position embeddings: inverse frequencies for default / linear / dynamic NTK / llama3 / yarn.

Same math as the published variants (and transformers' `modeling_rope_utils`), written as pure
functions of the rope parameter dict produced by :mod:`slimlm.models.config`.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def inv_freq_and_scale(params: dict[str, Any], head_dim: int, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Return (inv_freq: [head_dim // 2] float32, attention scaling applied to cos/sin)."""
    rtype = params.get("rope_type", "default")
    base = float(params.get("rope_theta", 10000.0))
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    idx = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv = 1.0 / (base**idx)
    max_pos = int(params.get("max_position_embeddings", 2048))
    if rtype == "default":
        return inv, 1.0
    factor = float(params.get("factor", 1.0))
    if rtype == "linear":
        return inv / factor, 1.0
    if rtype == "dynamic":
        seq = max(seq_len or max_pos, max_pos)
        base = base * ((factor * seq / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**idx), 1.0
    if rtype == "llama3":
        low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if rtype == "yarn":
        orig = float(params.get("original_max_position_embeddings") or max_pos)
        if not params.get("factor"):
            factor = max_pos / orig

        def mscale(s: float, m: float = 1.0) -> float:
            return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0

        att = params.get("attention_factor")
        if att is None:
            ms, msa = params.get("mscale"), params.get("mscale_all_dim")
            att = mscale(factor, ms) / mscale(factor, msa) if ms and msa else mscale(factor)
        beta_fast = params.get("beta_fast") or 32
        beta_slow = params.get("beta_slow") or 1

        def corr_dim(rot: float) -> float:
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

        lo, hi = corr_dim(beta_fast), corr_dim(beta_slow)
        if params.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
        extrap = 1 - ramp
        pos_freqs = base**idx
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
        return inv, float(att)
    raise ValueError(f"unsupported rope_type {rtype!r}")


class RotaryCache:
    """cos/sin tables for positions, grown on demand. ``lookup(positions) -> (cos, sin): [B, T, D]``.

    The table starts at ``INITIAL`` positions and doubles when a position beyond it is looked up (each
    row is the same float math whatever the table's length): a model of 8,192 positions would
    otherwise hold 4 MB of tables per dtype for a 16-token prompt."""

    INITIAL = 256

    def __init__(self, params: dict[str, Any], head_dim: int, dtype: torch.dtype):
        self.params, self.head_dim, self.dtype = params, head_dim, dtype
        self.dynamic = params.get("rope_type") == "dynamic"
        self._len = 0
        self._cos = torch.empty(0)
        self._sin = torch.empty(0)
        self._build(min(self.INITIAL, int(params.get("max_position_embeddings", 2048))) if not self.dynamic else 0)

    def _build(self, n: int, seq_len: int | None = None) -> None:
        n = max(n, 1)
        inv, scale = inv_freq_and_scale(self.params, self.head_dim, seq_len)
        t = torch.arange(n, dtype=torch.int64).float()
        freqs = torch.outer(t, inv)  # [n, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [n, D] (rotate-half layout)
        self._cos = (emb.cos() * scale).to(self.dtype)
        self._sin = (emb.sin() * scale).to(self.dtype)
        self._len = n

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, T] int64
        need = int(positions.max()) + 1
        if self.dynamic:
            # dynamic NTK: frequencies depend on the current sequence length (as in transformers)
            self._build(need, seq_len=need)
        elif need > self._len:
            self._build(max(need, 2 * self._len))
        return self._cos[positions], self._sin[positions]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos/sin: [B, T, 1, D] (rotate-half convention)."""
    d = cos.shape[-1]
    if d < x.shape[-1]:  # partial rotary
        return torch.cat([apply_rotary(x[..., :d], cos, sin), x[..., d:]], dim=-1)
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
