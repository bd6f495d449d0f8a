"""Frozen linear weights stored in the compute dtype while a bf16 run trains, restored bit for bit after.

Why: under ``torch.autocast("cpu", bfloat16)`` every matmul casts its fp32 weight to bf16 on every
call, and a weight that does not require grad is never in autocast's cast cache. So each step of a
LoRA (or IA3, prompt, Houlsby) run re-casts the whole frozen base in forward, and autograd keeps
each cast copy for backward (the input gradient needs it): a second, bf16 copy of the base lives
in every step's activations. Storing those weights in bf16 for the run gives the same matmuls (the
copy autocast would make is exactly this round-to-nearest-even bf16 tensor, so losses and gradients
are bit-identical; tests/train/test_frozen.py checks) without the casts or the saved copies: with
``slimlm.models.autocast``'s shared input copies, SmolLM2-135M LoRA r 16 at 1 x 512 tokens peaks at
1.95 GB instead of 2.24-2.28 (BENCHMARKS.md, session 15).

How: each frozen fp32 weight of a plain ``nn.Linear`` becomes its bf16 rounding ``hi``; the 16-bit
remainder ``bits(w) - bits(hi) << 16`` (in [-2^15, 2^15]; the rare +2^15 of a tie rounded down is
kept as a list of positions) is kept aside, so :meth:`FrozenCast.restore` rebuilds the original
fp32 bits exactly: the frozen base is unchanged by training, as every PEFT invariant test asserts.
Not touched: trainable weights, weights that share storage with an embedding (a tied head: the row
lookup must stay fp32), the bases of layers that read their weight in fp32 math (DoRA's norms), and
FSDP-sharded models.

    cast = FrozenCast.apply(model, torch.bfloat16)   # the Trainer does this for bf16 runs
    ...                                              # train under autocast
    cast.restore()                                   # fp32 weights, bit for bit
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimlm.utils.memory import release_free_memory

_ROWS = 1 << 20  # elements per chunk of the int64 bit arithmetic (8 MB temporaries)


@dataclass
class _Saved:
    mod: nn.Linear
    rem: torch.Tensor  # int16 [numel]: bits(w) - bits(hi) << 16, with +2^15 stored as -2^15 ...
    ties: torch.Tensor  # int64 [k]: ... at these flat positions (a tie rounded down: the remainder is +2^15)


def split_bf16(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``w`` -> (``hi`` = w.to(bf16) [same shape], remainder int16 [numel], tie positions int64)."""
    flat = w.detach().reshape(-1)
    hi = flat.to(torch.bfloat16)
    rem = torch.empty(flat.numel(), dtype=torch.int16)
    ties = []
    for i in range(0, flat.numel(), _ROWS):
        bits = flat[i:i + _ROWS].view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        top = (hi[i:i + _ROWS].view(torch.int16).to(torch.int64) & 0xFFFF) << 16
        d = bits - top  # in [-2^15, 2^15]: round to nearest moves the top half by at most half a step
        up = (d == 1 << 15).nonzero().squeeze(1)
        ties.append(up + i)
        d[up] = -(1 << 15)
        rem[i:i + _ROWS] = d.to(torch.int16)
    return hi.reshape(w.shape), rem, torch.cat(ties)


def join_bf16(hi: torch.Tensor, rem: torch.Tensor, ties: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_bf16`: the original fp32 tensor, bit for bit."""
    flat = hi.reshape(-1)
    out = torch.empty(flat.numel(), dtype=torch.float32)
    for i in range(0, flat.numel(), _ROWS):
        top = (flat[i:i + _ROWS].view(torch.int16).to(torch.int64) & 0xFFFF) << 16
        d = rem[i:i + _ROWS].to(torch.int64)
        tie = ties[(ties >= i) & (ties < i + _ROWS)] - i
        d[tie] = 1 << 15
        bits = (top + d) & 0xFFFFFFFF
        bits = torch.where(bits >= 1 << 31, bits - (1 << 32), bits)  # to a signed 32-bit pattern
        out[i:i + _ROWS] = bits.to(torch.int32).view(torch.float32)
    return out.reshape(hi.shape)


def _excluded(model: nn.Module) -> set[int]:
    """Storage of weights that must stay fp32: embeddings (a tied head shares them) and the bases of
    layers that read their weight outside a matmul (``reads_base_weight``: DoRA's row norms)."""
    out: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            out.add(m.weight.data_ptr())
        if getattr(m, "reads_base_weight", False):
            w = getattr(getattr(m, "base_layer", None), "weight", None)
            if isinstance(w, torch.Tensor):
                out.add(w.data_ptr())
    return out


@dataclass
class FrozenCast:
    """The frozen weights a run stores in ``dtype`` and what restores them (see module docstring)."""

    saved: list[_Saved] = field(default_factory=list)
    model: nn.Module | None = None

    @classmethod
    def apply(cls, model: nn.Module, dtype: torch.dtype) -> FrozenCast:
        """Store every eligible frozen fp32 ``nn.Linear`` weight of ``model`` in ``dtype`` (bf16 only)."""
        cast = cls()
        if dtype != torch.bfloat16:
            return cast
        skip = _excluded(model)
        for m in model.modules():
            w = getattr(m, "weight", None)
            if (type(m) is not nn.Linear or not isinstance(w, nn.Parameter) or w.requires_grad
                    or w.dtype != torch.float32 or w.data_ptr() in skip or type(w.data) is not torch.Tensor
                    or not bool(torch.isfinite(w).all())):  # a NaN's bf16 rounding is not invertible
                continue
            hi, rem, ties = split_bf16(w.data)
            # a new Parameter, not ``w.data = hi``: the runtime's inference fusion (q|k|v, gate|up views
            # into one fp32 tensor) sees the swap by identity and drops that tensor at the next call
            m.weight = nn.Parameter(hi, requires_grad=False)
            cast.saved.append(_Saved(m, rem, ties))
        cast.model = model
        if cast.saved:
            unfuse = getattr(model, "unfuse_projections_", None)
            if unfuse is not None:
                unfuse()  # frees the fp32 weights now (the fused tensor they were views of)
            release_free_memory()  # and hands their pages back: RSS drops by what the cast saved
        return cast

    @property
    def count(self) -> int:
        return len(self.saved)

    def restore(self) -> None:
        """Every cast weight back to its original fp32 bits (idempotent)."""
        for s in self.saved:
            s.mod.weight = nn.Parameter(join_bf16(s.mod.weight.data, s.rem, s.ties), requires_grad=False)
        fuse = getattr(self.model, "fuse_projections_", None)
        if self.saved and fuse is not None:
            fuse()  # the inference fusion the swap dropped, over the restored weights
        if self.saved:
            release_free_memory()  # the bf16 copies and the separate weights fusion copied
        self.saved.clear()
