"""NF4 linear (QLoRA's 4-bit NormalFloat): codes two per byte, block-wise absmax, optional double quant.

Input: a ``slimlm.quant.nf4.NF4Weight`` (the weight ``[out, in]`` flattened row-major, cut into blocks
of ``block_size`` values; code ``c`` means level ``NF4_LEVELS[c]``; per-block absmax either float32
or double-quantized as ``absmax = absmax_codes * absmax_scale[block // double_block_size] + offset``).

Storage: ``codes`` uint8 ``[out * in / 2]`` (element ``2j`` in the low nibble), and either
``absmax`` float32 ``[n_blocks]`` or ``absmax_codes`` int8 ``[n_blocks]`` + ``absmax_scale`` float32
``[ceil(n_blocks / double_block_size)]`` + ``absmax_offset`` float32 ``[1]``. NF4 levels are not an
affine grid, so there is no integer kernel. Calls of up to 8 rows (decode) take slimlm's
``nf4_gemv`` kernel (``slimlm/kernels/nf4.cpp``: codes expanded to levels in registers, fp32 dots,
no de-quantized copy; bf16 activations use AVX-512 BF16 dot products where the CPU has them); larger calls look the levels up, scale by the
block absmax and run a bf16/fp32 matmul (``cache_dense = True`` keeps that dense copy; off by default).

Example::

    nw = quantize_nf4(linear.weight, block_size=64, double_quant=True)
    mod = NF4Linear.from_quantized(nw, bias=linear.bias)
"""

from __future__ import annotations

from typing import Any

import torch

from slimlm.models.modules import register_linear_kind
from slimlm.quant.linear.autograd import kernels_allowed
from slimlm.quant.linear.base import QuantLinearBase, spec_int
from slimlm.quant.nf4 import NF4_LEVELS, NF4Weight
from slimlm.quant.packing import pack_int4, unpack_int4
from slimlm.utils.errors import SlimlmError

# byte b -> (level of its low nibble, level of its high nibble), stored as one int64 per byte
_BYTE_LEVELS = torch.stack([NF4_LEVELS[torch.arange(256) & 0xF], NF4_LEVELS[torch.arange(256) >> 4]], dim=-1)  # [256, 2]
_BYTE_PAIRS = _BYTE_LEVELS.contiguous().view(torch.int64).reshape(256)


@register_linear_kind
class NF4Linear(QuantLinearBase):
    """4-bit NormalFloat weight-only linear (QLoRA storage)."""

    kind = "nf4"
    codes: torch.Tensor
    absmax: torch.Tensor | None
    absmax_codes: torch.Tensor | None
    absmax_scale: torch.Tensor | None
    absmax_offset: torch.Tensor | None
    cache_dense = False

    def __init__(self, in_features: int, out_features: int, block_size: int = 64, double_quant: bool = True,
                 double_block_size: int = 256, bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        numel = in_features * out_features
        if block_size <= 0 or numel % block_size != 0 or block_size % 2 != 0:
            raise SlimlmError(f"NF4 block_size {block_size} must be even and divide {out_features}x{in_features}")
        self.block_size, self.double_quant, self.double_block_size = block_size, double_quant, double_block_size
        nb = numel // block_size
        self.register_buffer("codes", torch.zeros(numel // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax", None)
            self.register_buffer("absmax_codes", torch.zeros(nb, dtype=torch.int8))
            self.register_buffer("absmax_scale", torch.ones(-(-nb // double_block_size), dtype=torch.float32))
            self.register_buffer("absmax_offset", torch.zeros(1, dtype=torch.float32))
        else:
            self.register_buffer("absmax", torch.ones(nb, dtype=torch.float32))
            self.register_buffer("absmax_codes", None)
            self.register_buffer("absmax_scale", None)
            self.register_buffer("absmax_offset", None)
        self._dense: torch.Tensor | None = None

    @classmethod
    def from_quantized(cls, nw: NF4Weight, bias: torch.Tensor | None = None) -> NF4Linear:
        """Build from an :class:`NF4Weight` of a 2-D weight ``[out, in]``."""
        if len(nw.shape) != 2:
            raise SlimlmError(f"NF4Linear needs a 2-D weight, got shape {nw.shape}")
        out, inp = nw.shape
        mod = cls(inp, out, nw.block_size, nw.double_quant, nw.double_block_size, bias)
        with torch.no_grad():
            mod.codes.copy_(pack_int4(nw.codes.reshape(-1)))
            if nw.double_quant:
                assert mod.absmax_codes is not None and mod.absmax_scale is not None and mod.absmax_offset is not None
                assert nw.absmax_codes is not None and nw.absmax_scale is not None
                mod.absmax_codes.copy_(nw.absmax_codes)
                mod.absmax_scale.copy_(nw.absmax_scale.float())
                mod.absmax_offset.fill_(nw.absmax_offset)
            else:
                assert mod.absmax is not None and nw.absmax is not None
                mod.absmax.copy_(nw.absmax.float())
        return mod

    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> NF4Linear:
        b = torch.zeros(out_features) if bias else None
        return cls(in_features, out_features, spec_int(spec, "block_size", cls.kind), bool(spec["double_quant"]),
                   int(spec.get("double_block_size", 256)), b)

    def spec(self) -> dict[str, Any]:
        return {"block_size": self.block_size, "double_quant": self.double_quant,
                "double_block_size": self.double_block_size}

    def process_after_loading(self) -> None:
        self._dense = None

    def to_nf4_weight(self) -> NF4Weight:
        codes = unpack_int4(self.codes, self.in_features * self.out_features)
        offset = 0.0 if self.absmax_offset is None else float(self.absmax_offset[0])
        return NF4Weight(codes, (self.out_features, self.in_features), self.block_size, self.absmax,
                         self.absmax_codes, self.absmax_scale, offset, self.double_block_size)

    def block_absmax(self) -> torch.Tensor:
        """[n_blocks] float32, the same arithmetic as ``NF4Weight.block_absmax``."""
        if self.absmax is not None:
            return self.absmax.float()
        assert self.absmax_codes is not None and self.absmax_scale is not None and self.absmax_offset is not None
        s2 = self.absmax_scale.float().repeat_interleave(self.double_block_size)[: self.absmax_codes.numel()]
        return self.absmax_codes.float() * s2 + float(self.absmax_offset[0])

    def dense_weight(self) -> torch.Tensor:
        # one gather per byte, of both levels at once (two float32 viewed as one int64: 2-8x faster than
        # advanced indexing on CPU); int32 indices avoid an int64 copy of the codes
        pairs = _BYTE_PAIRS.index_select(0, self.codes.to(torch.int32))  # [numel/2] int64
        vals = pairs.view(torch.float32).reshape(-1, self.block_size)  # [n_blocks, block]
        return (vals * self.block_absmax().unsqueeze(1)).reshape(self.out_features, self.in_features)

    def _gemv(self, x2: torch.Tensor, bf16_dot: bool = True) -> torch.Tensor | None:
        """``nf4_gemv`` for a few rows ``x2: [M <= 8, in]``, or None where the kernel cannot take the call."""
        if x2.shape[0] > 8 or x2.dtype not in (torch.float32, torch.bfloat16) or self.cache_dense:
            return None
        if not kernels_allowed() or torch.is_grad_enabled() and (x2.requires_grad or self.codes.requires_grad):
            return None  # no backward in the kernel (QLoRA training takes the de-quantizing path)
        if self.in_features % self.block_size or self.block_size % 8:
            return None  # blocks must not straddle rows and hold whole vectors of 8
        fn = _nf4_kernel()
        if fn is None:
            return None
        empty = _EMPTY
        if self.absmax is not None:
            return fn(x2, self.codes, _LEVELS, self.absmax, empty, empty, 0.0, 1, self.out_features, self.block_size,
                      bf16_dot)
        assert self.absmax_codes is not None and self.absmax_scale is not None and self.absmax_offset is not None
        return fn(x2, self.codes, _LEVELS, empty, self.absmax_codes, self.absmax_scale, float(self.absmax_offset[0]),
                  self.double_block_size, self.out_features, self.block_size, bf16_dot)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        y = self._gemv(x2)
        return self._dense_matmul(x2) if y is None else y


_LEVELS = NF4_LEVELS.float().contiguous()
_EMPTY = torch.empty(0)


def _nf4_kernel():  # type: ignore[no-untyped-def]
    """slimlm's C++ ``nf4_gemv`` or None (kernels unavailable: the de-quantizing path is used)."""
    from slimlm import kernels

    return getattr(kernels.load(), "nf4_gemv", None)
