"""Weight-only low-bit linears: packed 2..7-bit codes (``IntxWeightLinear``) and the int4 CPU kernel
(``Int4WeightLinear``).

Storage (the portable checkpoint, identical for every bit width):

- ``qweight`` uint8 ``[out, packed_length(in, bits)]``: codes packed along the input dim with
  ``slimlm.quant.packing.pack_codes`` (int4 two per byte, int2 four per byte, int3 eight per 3 bytes,
  5/6/7-bit dense bit stream);
- ``scale`` float32 ``[out, groups]``; ``zero`` uint8 ``[out, groups]`` (asymmetric only; symmetric
  zero is ``2**(bits-1)``); ``g_idx`` int32 ``[in]`` (act-order only).

``w = (q - zero[:, g_idx]) * scale[:, g_idx]``: bit-identical to ``QuantizedWeight.dequantize()``.

Runtime: ``IntxWeightLinear`` unpacks and dequantizes on every call (set ``cache_dense = True`` to trade
the memory saving for speed), except decode-size calls where slimlm's kernels are available: those run
``qgemv`` on an unpacked int8 copy of the codes made at load time (1 byte per weight in memory). ``Int4WeightLinear.process_after_loading`` repacks into the layout of
``aten._weight_int4pack_mm_for_cpu`` (bf16 activations), with act-order handled by permuting the input
columns once at load time (and ``x`` in forward) so every kernel group is contiguous; it then drops
the portable ``qweight`` and rebuilds it exactly when the state dict is saved. With slimlm's decode
kernels, decode-size calls run ``qgemv`` (activations rounded to int8 per chunk, integer dots; see
docs/runtime.md) on a copy of the codes re-laid in 16-row tiles (``out % 16 == 0``; otherwise on the
portable nibbles, which then stay): an int4 linear holds 1 byte per weight in memory (torch's layout
for prefill and eval, the tiles for decode), 0.5 without the decode kernels. Shapes the kernel cannot take (out % 16 != 0, no kernel group 32..256 dividing the quantization
group and the row, irregular g_idx) use the reference path.
"""

from __future__ import annotations

from typing import Any

import torch

from slimlm import kernels
from slimlm.models.modules import register_linear_kind
from slimlm.quant.kernels import (
    ACT_DTYPE,
    Int4Layout,
    int4_kernel_group,
    int4_mm,
    int4_pack,
    int4_scales_and_zeros,
)
from slimlm.quant.linear.base import (
    QuantLinearBase,
    check_qweight,
    dequantize_grouped,
    group_index,
    n_groups,
    spec_int,
)
from slimlm.quant.packing import pack_codes, packed_length, unpack_codes
from slimlm.quant.qtensor import QuantizedWeight


@register_linear_kind
class IntxWeightLinear(QuantLinearBase):
    """Weight-only 2..8-bit grouped linear with packed storage; reference (dequantize + matmul) forward."""

    dense_large_fp32 = True

    kind = "intx_weight"
    allowed_bits: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    qweight: torch.Tensor | None
    scale: torch.Tensor
    zero: torch.Tensor | None
    g_idx: torch.Tensor | None
    cache_dense = False  # runtime option (not saved): keep a dense copy in the activation dtype

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool,
                 act_order: bool = False, bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        if bits not in self.allowed_bits:
            raise ValueError(f"{type(self).__name__} takes bits in {self.allowed_bits}, got {bits}")
        self.bits, self.group_size, self.symmetric, self.act_order = bits, group_size, symmetric, act_order
        ng = n_groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, packed_length(in_features, bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, ng, dtype=torch.float32))
        self.register_buffer("zero", None if symmetric else torch.zeros(out_features, ng, dtype=torch.uint8))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32) if act_order else None)
        self._dense: torch.Tensor | None = None

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> IntxWeightLinear:
        """Build from a :class:`QuantizedWeight` (codes ``[out, in]`` in ``[0, 2**bits)``)."""
        check_qweight(qw, cls.allowed_bits, cls.__name__)
        out, inp = qw.shape
        mod = cls(inp, out, qw.bits, qw.group_size, qw.symmetric, qw.g_idx is not None, bias)
        assert mod.qweight is not None
        with torch.no_grad():
            mod.qweight.copy_(pack_codes(qw.qweight, qw.bits))
            mod.scale.copy_(qw.scale.float())
            if mod.zero is not None:
                mod.zero.copy_(qw.zero.to(torch.uint8))
            elif not torch.all(qw.zero == 2 ** (qw.bits - 1)):
                raise ValueError(f"symmetric {qw.bits}-bit weight must have zero {2 ** (qw.bits - 1)}")
            if mod.g_idx is not None and qw.g_idx is not None:
                mod.g_idx.copy_(qw.g_idx.to(torch.int32))
        mod.process_after_loading()
        return mod

    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> IntxWeightLinear:
        b = torch.zeros(out_features) if bias else None
        return cls(in_features, out_features, spec_int(spec, "bits", cls.kind), spec_int(spec, "group_size", cls.kind),
                   bool(spec["symmetric"]), bool(spec.get("act_order", False)), b)

    def spec(self) -> dict[str, Any]:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "act_order": self.act_order}

    def process_after_loading(self) -> None:
        self._dense = None
        codes: torch.Tensor | None = None
        if self.qweight is not None and self.bits == 4:
            codes = self.qweight  # packed nibbles are what qgemv reads
        elif self.qweight is not None and self.bits < 8 and self.g_idx is None and kernels.supported()[0]:
            # 2/3/5/6/7 bits: qgemv's int8 path reads the codes unpacked (0 .. 2**bits - 1), one byte per
            # weight held for decode (de-quantizing the whole matrix per decode step ran at 3 tok/s)
            codes = self.codes().to(torch.int8).contiguous()
        self._set_decode_spec(codes, None if codes is None else self.zeros_full())

    # --- math -----------------------------------------------------------------------------------
    def codes(self) -> torch.Tensor:
        """Unpacked codes ``[out, in]`` uint8."""
        assert self.qweight is not None
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def zeros_full(self) -> torch.Tensor:
        """Zero points ``[out, groups]`` int32 (the fixed ``2**(bits-1)`` when symmetric)."""
        if self.zero is None:
            return torch.full(tuple(self.scale.shape), 2 ** (self.bits - 1), dtype=torch.int32)
        return self.zero.to(torch.int32)

    def dense_weight(self) -> torch.Tensor:
        g = group_index(self.in_features, self.group_size, self.g_idx)
        return dequantize_grouped(self.codes(), self.scale, self.zeros_full(), g)  # [out, in] float32

    def to_quantized(self) -> QuantizedWeight:
        """The :class:`QuantizedWeight` this module stores (for exporters)."""
        return QuantizedWeight(self.codes(), self.scale.float().clone(), self.zeros_full(), self.bits,
                               self.group_size, self.symmetric, None if self.g_idx is None else self.g_idx.clone())

    def _reference_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self._dense_matmul(x2)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self._reference_matmul(x2)


@register_linear_kind
class Int4WeightLinear(IntxWeightLinear):
    """Weight-only 4-bit grouped linear on ``aten._weight_int4pack_mm_for_cpu`` (bf16 activations)."""

    kind = "int4_weight"
    allowed_bits = (4,)

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 symmetric: bool = False, act_order: bool = False, bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bits, group_size, symmetric, act_order, bias)
        self.register_buffer("_packed", None, persistent=False)  # [out, in/2] kernel layout
        self.register_buffer("_scales_zeros", None, persistent=False)  # [in/G', out, 2] bf16
        self.register_buffer("_perm", None, persistent=False)  # [in] input column order (act-order)
        self._kernel_group = 0
        self._layout: Int4Layout | None = None  # set when the portable qweight was dropped

    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> Int4WeightLinear:
        spec = {"bits": 4, **spec}
        mod = super().create(in_features, out_features, bias, spec)
        assert isinstance(mod, Int4WeightLinear)
        return mod

    @property
    def uses_kernel(self) -> bool:
        return self._packed is not None

    def _contiguous_order(self) -> torch.Tensor | None:
        """Column order making every group contiguous and full (last may be short); None if impossible."""
        if self.g_idx is None:
            return torch.arange(self.in_features)
        g = self.g_idx.long()
        perm = torch.sort(g, stable=True).indices
        expected = torch.arange(self.in_features) // self.group_size
        return perm if torch.equal(g[perm], expected) else None

    def process_after_loading(self) -> None:
        if self._layout is not None:  # already converted (the portable copy dropped): the kernel layouts stand
            self._dense = None
            return
        super().process_after_loading()  # the decode spec: 16-row tiles (a copy) or the portable codes
        kg = int4_kernel_group(self.group_size, self.in_features, self.out_features)
        perm = self._contiguous_order()
        self.__dict__["_fast"] = None
        if kg is None or perm is None:
            self._packed = self._scales_zeros = self._perm = None
            return
        q = self.codes()[:, perm]  # [out, in] codes in kernel column order
        src_group = (torch.arange(self.in_features // kg) * kg) // self.group_size  # kernel group -> our group
        packed = int4_pack(q)
        self._packed = packed
        self._scales_zeros = int4_scales_and_zeros(self.scale[:, src_group], self.zeros_full()[:, src_group], ACT_DTYPE)
        self._perm = None if self.g_idx is None else perm
        self._kernel_group = kg
        self.__dict__["_fast"] = (packed, kg, self._scales_zeros, self._perm, self.bias)
        layout = Int4Layout(self.out_features, self.in_features)
        spec = self.decode_spec()
        if (spec is None or spec[0] is not self.qweight) and layout.verify(packed, q):
            # hold the codes once per kernel: torch's layout for prefill, the decode tiles (when out % 16
            # == 0; otherwise the decode kernel reads the portable copy, which then stays); the portable
            # layout is rebuilt on save
            self._layout = layout
            self.qweight = None

    def codes(self) -> torch.Tensor:
        if self.qweight is not None:
            return super().codes()
        assert self._layout is not None and self._packed is not None
        q = self._layout.unpack(self._packed)  # kernel column order
        if self._perm is not None:
            q = q[:, torch.argsort(self._perm)]
        return q

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is None:
            destination[prefix + "qweight"] = pack_codes(self.codes(), 4)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.qweight is None:  # back to the portable layout; call process_after_loading() again
            self.qweight = torch.zeros(self.out_features, packed_length(self.in_features, 4), dtype=torch.uint8)
            self._packed = self._scales_zeros = self._perm = None
            self._layout = None
            self.__dict__["_fast"] = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self._packed is None or self._scales_zeros is None:
            return self._reference_matmul(x2)
        if self._perm is not None:
            x2 = x2[:, self._perm]  # [M, in] in kernel column order
        return int4_mm(x2, self._packed, self._kernel_group, self._scales_zeros)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]. torch's int4 kernel in one call and as few Python-level ops as
        # possible (module attribute lookups of buffers cost microseconds per call).
        fast = self.__dict__.get("_fast")
        if fast is None:
            return super()._forward(x)
        packed, group, scales_zeros, perm, bias = fast
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        if perm is not None:
            x2 = x2[:, perm]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(ACT_DTYPE).contiguous(), packed, group, scales_zeros)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
