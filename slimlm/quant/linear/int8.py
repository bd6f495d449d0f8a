"""Weight-only int8 linear: one byte per weight plus float32 scales (and int8 zeros when asymmetric).

Storage (the checkpoint): ``weight`` int8 ``[out, in]`` = code - 128, ``scale`` float32 ``[out, groups]``,
``zero`` int8 ``[out, groups]`` = zero - 128 (asymmetric only), ``g_idx`` int32 ``[in]`` (act-order only).
So ``w = (weight - zero) * scale`` per group, bit-identical to ``QuantizedWeight.dequantize()``.

Fast path (per-channel, one group): ``aten._weight_int8pack_mm`` with bf16 activations; an asymmetric
zero is folded exactly as ``- rowsum(x) * zero * scale``. Grouped weights run the reference path
(dequantize to the activation dtype, then matmul).

Example::

    qw = quantize_weight(linear.weight, bits=8, group_size=-1, symmetric=True)
    mod = Int8WeightLinear.from_quantized(qw, bias=linear.bias)
    y = mod(x)  # x: [..., in] fp32 or bf16 -> [..., out] same dtype
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from slimlm.models.modules import register_linear_kind
from slimlm.quant.kernels import ACT_DTYPE, KERNEL_ALIGN, aligned, has_int8_weight_kernel, int8_weight_mm
from slimlm.quant.linear.base import (
    QuantLinearBase,
    check_qweight,
    dequantize_grouped,
    group_index,
    n_groups,
    spec_int,
)
from slimlm.quant.qtensor import QuantizedWeight


@register_linear_kind
class Int8WeightLinear(QuantLinearBase):
    """Weight-only int8 (per-channel or grouped, symmetric or asymmetric, optional act-order g_idx)."""

    dense_large_fp32 = True

    kind = "int8_weight"
    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, group_size: int, symmetric: bool,
                 act_order: bool = False, bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.group_size, self.symmetric, self.act_order = group_size, symmetric, act_order
        ng = n_groups(in_features, group_size)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, ng, dtype=torch.float32))
        self.register_buffer("zero", None if symmetric else torch.zeros(out_features, ng, dtype=torch.int8))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if act_order else None)
        self.register_buffer("_zero_scale", None, persistent=False)  # [out] zero * scale (asym fast path)
        self.use_kernel = False

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> Int8WeightLinear:
        """Build from an 8-bit :class:`QuantizedWeight` (codes 0..255, zero 128 when symmetric)."""
        check_qweight(qw, (8,), "Int8WeightLinear")
        out, inp = qw.shape
        mod = cls(inp, out, qw.group_size, qw.symmetric, qw.g_idx is not None, bias)
        with torch.no_grad():
            mod.weight.copy_((qw.qweight.to(torch.int16) - 128).to(torch.int8))
            mod.scale.copy_(qw.scale.float())
            if mod.zero is not None:
                mod.zero.copy_((qw.zero.to(torch.int16) - 128).to(torch.int8))
            elif not torch.all(qw.zero == 128):
                raise ValueError("symmetric 8-bit weight must have zero 128")
            if mod.g_idx is not None and qw.g_idx is not None:
                mod.g_idx.copy_(qw.g_idx.to(torch.int32))
        mod.process_after_loading()
        return mod

    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> Int8WeightLinear:
        b = torch.zeros(out_features) if bias else None
        return cls(in_features, out_features, spec_int(spec, "group_size", cls.kind), bool(spec["symmetric"]),
                   bool(spec.get("act_order", False)), b)

    def spec(self) -> dict[str, Any]:
        return {"bits": 8, "group_size": self.group_size, "symmetric": self.symmetric, "act_order": self.act_order}

    def process_after_loading(self) -> None:
        ng = self.scale.shape[1]
        self.use_kernel = ng == 1 and self.g_idx is None and has_int8_weight_kernel()
        if self.zero is not None and ng == 1:
            self._zero_scale = self.zero.float()[:, 0] * self.scale.float()[:, 0]
        if self.use_kernel and self.weight.data_ptr() % KERNEL_ALIGN:
            # a safetensors load can leave it 8-byte aligned (see aligned()): copy once here, not in
            # int8_weight_mm on every call of the asymmetric kernel path
            self.weight = aligned(self.weight)
        fast = self.use_kernel and self.zero is None
        self.__dict__["_fast"] = (self.weight, self.scale[:, 0].to(ACT_DTYPE), self.bias) if fast else None
        self._set_decode_spec(self.weight, self.zero)  # codes and zero are both stored minus 128

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_fast"] = None  # call process_after_loading() again
        super()._load_from_state_dict(*args, **kwargs)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]; the symmetric per-channel path is one torch kernel call
        fast = self.__dict__.get("_fast")
        if fast is None:
            return super()._forward(x)
        weight, scale, bias = fast
        x2 = x.reshape(-1, self.in_features).to(ACT_DTYPE).contiguous()  # [M, in]
        y = torch.ops.aten._weight_int8pack_mm(x2, weight, scale)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    # --- math -----------------------------------------------------------------------------------
    def dense_weight(self) -> torch.Tensor:
        g = group_index(self.in_features, self.group_size, self.g_idx)
        zero = 0.0 if self.zero is None else self.zero
        return dequantize_grouped(self.weight, self.scale, zero, g)  # [out, in] float32

    def to_quantized(self) -> QuantizedWeight:
        """The :class:`QuantizedWeight` this module stores (for exporters)."""
        zero = (torch.full_like(self.scale, 128, dtype=torch.int32) if self.zero is None
                else self.zero.to(torch.int32) + 128)
        return QuantizedWeight((self.weight.to(torch.int16) + 128).to(torch.uint8), self.scale.float().clone(),
                               zero, 8, self.group_size, self.symmetric,
                               None if self.g_idx is None else self.g_idx.clone())

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # x2: [M, in]
        if self.use_kernel:
            y = int8_weight_mm(x2, self.weight, self.scale[:, 0])  # [M, out]
            if self._zero_scale is not None:
                y = (y.float() - x2.float().sum(dim=-1, keepdim=True) * self._zero_scale).to(x2.dtype)
            return y
        dt = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16) else torch.float32
        return F.linear(x2.to(dt), self.dense_weight().to(dt))
