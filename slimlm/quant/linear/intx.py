"""Weight-only low-bit linears: packed 2..7-bit codes (``IntxWeightLinear``) and 4-bit (``Int4WeightLinear``).

Storage (the portable checkpoint, identical for every bit width):

- ``qweight`` uint8 ``[out, packed_length(in, bits)]``: codes packed along the input dim with
  ``slimlm.quant.packing.pack_codes`` (int4 two per byte, int2 four per byte, int3 eight per 3 bytes,
  5/6/7-bit dense bit stream);
- ``scale`` float32 ``[out, groups]``; ``zero`` uint8 ``[out, groups]`` (asymmetric only; symmetric
  zero is ``2**(bits-1)``); ``g_idx`` int32 ``[in]`` (act-order only).

``w = (q - zero[:, g_idx]) * scale[:, g_idx]``: bit-identical to ``QuantizedWeight.dequantize()``.

Runtime: each module holds its codes in **one** layout, which every call reads (``process_after_loading``
picks it; the portable ``qweight`` is then dropped and rebuilt exactly when the state dict is saved):

- 2/3/4-bit codes with ``out % 16 == 0`` (and rows/groups that are multiples of 32): tiles of 16 rows
  holding the codes at their own size: 4-bit tiles (``slimlm.kernels.tile_int4``; 0.5 byte per weight),
  2/3-bit bit planes (``slimlm.kernels.tile_lowbit``; 0.25 / 0.375 byte per weight). Decode-size calls run ``qgemv`` on them
  (activations rounded to int8 per chunk, integer dots; see docs/runtime.md); larger calls (prefill,
  eval, calibration) de-quantize the tiles per call (``kernels.dequant_tiles``, the exact fp32 math,
  then rounded to the activation dtype) into a bf16/fp32 GEMM. Act-order weights whose groups become
  contiguous under a column permutation hold their tiles in that order and permute ``x`` instead.
- 5/6/7-bit (or 2/3-bit with ``out % 16 != 0``): int8 codes ``[out, in]`` (1 byte per weight), read by
  qgemv's int8 path and de-quantized per call for larger calls.
- 4-bit with ``out % 16 != 0``: the portable nibbles themselves (qgemv reads them).
- Without slimlm's kernels: ``Int4WeightLinear`` repacks into ``aten._weight_int4pack_mm_for_cpu``'s
  layout (bf16 activations); other shapes and bit widths keep the portable codes and de-quantize per
  call (``cache_dense = True`` trades the memory saving for speed).
Shapes the kernels cannot take (irregular g_idx, rows or groups not multiples of 32) use the reference
path on the portable codes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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
from slimlm.quant.linear.autograd import kernels_allowed
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
    _tiles: torch.Tensor | None
    _codes8: torch.Tensor | None
    _perm: torch.Tensor | None
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
        # the runtime layouts (not saved; see the module docstring): at most one is set, then qweight is None
        self.register_buffer("_tiles", None, persistent=False)  # uint8 4-bit [out/16, in/8, 64], 2/3-bit [out/16, in/32, 64 bits]
        self.register_buffer("_codes8", None, persistent=False)  # int8 [out, in] codes
        self.register_buffer("_perm", None, persistent=False)  # int64 [in] runtime column order (act-order)
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
        if self.qweight is None:  # already converted (the portable copy dropped): the runtime layout stands
            return
        self._tiles = self._codes8 = self._perm = None
        self.__dict__["_decode"] = self.__dict__["_qspec"] = None
        order = self._contiguous_order()
        if order is None or self.bits == 8 or not kernels.supported()[0]:
            return
        codes = self.codes()
        q = codes if self.g_idx is None else codes[:, order]  # [out, in] in the runtime column order
        perm = None if self.g_idx is None else order
        zero = self.zeros_full()
        spec = None
        if self.bits <= 4 and self.out_features % kernels.TILE_ROWS == 0:
            codes_in = pack_codes(q, 4) if self.bits == 4 else q
            spec = kernels.quant_spec(codes_in, self.bias, self.scale, zero, self.group_size, self.in_features,
                                      bits=self.bits if self.bits < 4 else None)
            if spec is not None:  # 4-bit tiles, or 2/3-bit bit-plane tiles (the codes' own size)
                self._tiles = spec[0]
        elif self.bits == 4 and perm is None:
            spec = kernels.quant_spec(self.qweight, self.bias, self.scale, zero, self.group_size, self.in_features)
            if spec is not None:  # qgemv reads the portable nibbles: they stay the one layout
                self.__dict__["_decode"] = self.__dict__["_qspec"] = spec
            return
        elif self.bits != 4:
            spec = kernels.quant_spec(q.to(torch.int8), self.bias, self.scale, zero, self.group_size, self.in_features)
            if spec is not None:  # int8 codes: qgemv's int8 path (1 byte per weight)
                self._codes8 = spec[0]
        if spec is None:
            return
        self._perm = perm
        self.__dict__["_qspec"] = spec
        self.__dict__["_decode"] = spec if perm is None else None  # decode_layer takes no permutation
        self.qweight = None

    def _contiguous_order(self) -> torch.Tensor | None:
        """Column order making every group contiguous and full (last may be short); None if impossible."""
        if self.g_idx is None:
            return torch.arange(self.in_features)
        g = self.g_idx.long()
        perm = torch.sort(g, stable=True).indices
        expected = torch.arange(self.in_features) // self.group_size
        return perm if torch.equal(g[perm], expected) else None

    @property
    def uses_kernel(self) -> bool:
        """Whether the codes are held in a kernel layout (every call then avoids unpacking them)."""
        return self.qweight is None

    # --- math -----------------------------------------------------------------------------------
    def _runtime_codes(self) -> torch.Tensor:
        """Codes ``[out, in]`` uint8 in the runtime column order (``_perm``), from the one layout held."""
        if self._tiles is not None:
            return kernels.untile_int4(self._tiles) if self.bits == 4 else kernels.untile_lowbit(self._tiles)
        if self._codes8 is not None:
            return self._codes8.to(torch.uint8)
        assert self.qweight is not None
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def codes(self) -> torch.Tensor:
        """Unpacked codes ``[out, in]`` uint8."""
        q = self._runtime_codes()
        if self._perm is not None:
            q = q[:, torch.argsort(self._perm)]
        return q

    def zeros_full(self) -> torch.Tensor:
        """Zero points ``[out, groups]`` int32 (the fixed ``2**(bits-1)`` when symmetric)."""
        if self.zero is None:
            return torch.full(tuple(self.scale.shape), 2 ** (self.bits - 1), dtype=torch.int32)
        return self.zero.to(torch.int32)

    def _runtime_dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The de-quantized weight ``[out, in]`` in the runtime column order, in ``dtype`` (fp32/bf16)."""
        zero: torch.Tensor | float = float(2 ** (self.bits - 1)) if self.zero is None else self.zero
        if self._tiles is not None:
            w = kernels.dequant_tiles(self._tiles, self.scale, zero, self.group_size, dtype)
            if w is not None:
                return w
        g = torch.arange(self.in_features) // self.group_size if self._perm is not None else \
            group_index(self.in_features, self.group_size, self.g_idx)
        return dequantize_grouped(self._runtime_codes(), self.scale, zero, g).to(dtype)

    def dense_weight(self) -> torch.Tensor:
        w = self._runtime_dense(torch.float32)  # [out, in] float32
        if self._perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self._perm] = w  # back to the checkpoint's column order
        return out

    def to_quantized(self) -> QuantizedWeight:
        """The :class:`QuantizedWeight` this module stores (for exporters)."""
        return QuantizedWeight(self.codes(), self.scale.float().clone(), self.zeros_full(), self.bits,
                               self.group_size, self.symmetric, None if self.g_idx is None else self.g_idx.clone())

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.qweight is None:  # the portable layout, rebuilt exactly from the runtime one
            destination[prefix + "qweight"] = pack_codes(self.codes(), self.bits)

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.qweight is None:  # back to the portable layout; call process_after_loading() again
            self.qweight = torch.zeros(self.out_features, packed_length(self.in_features, self.bits), dtype=torch.uint8)
            self._tiles = self._codes8 = self._perm = None
            self.__dict__["_qspec"] = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _decode_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        spec = self.__dict__.get("_qspec")
        if spec is None or x.numel() > kernels.SMALL_ROWS * self.in_features or not kernels_allowed():
            return None
        if self._perm is not None:
            x = x.index_select(-1, self._perm)
        return kernels.qlinear(x, spec)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # x2: [M, in] -> [M, out]: de-quantize per call (or the opt-in cached copy) into a bf16/fp32 GEMM
        dt = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16) else torch.float32
        w = self._dense
        if w is None or w.dtype != dt:
            w = self._runtime_dense(dt)
            if self.cache_dense:
                self._dense = w
        if self._perm is not None:
            x2 = x2[:, self._perm]
        return F.linear(x2.to(dt), w)


@register_linear_kind
class Int4WeightLinear(IntxWeightLinear):
    """Weight-only 4-bit grouped linear: slimlm's 4-bit tiles, or ``aten._weight_int4pack_mm_for_cpu``'s
    layout (bf16 activations) where slimlm's kernels are unavailable."""

    kind = "int4_weight"
    allowed_bits = (4,)

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int = 128,
                 symmetric: bool = False, act_order: bool = False, bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bits, group_size, symmetric, act_order, bias)
        self.register_buffer("_packed", None, persistent=False)  # [out, in/2] torch's kernel layout
        self.register_buffer("_scales_zeros", None, persistent=False)  # [in/G', out, 2] bf16
        self._kernel_group = 0
        self._layout: Int4Layout | None = None  # set when torch's layout replaced the portable qweight

    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> Int4WeightLinear:
        spec = {"bits": 4, **spec}
        mod = super().create(in_features, out_features, bias, spec)
        assert isinstance(mod, Int4WeightLinear)
        return mod

    def process_after_loading(self) -> None:
        converted = self.qweight is None
        super().process_after_loading()  # slimlm's tiles (or the portable nibbles for qgemv) when it can
        if converted or self.__dict__.get("_qspec") is not None:
            return
        self.__dict__["_fast"] = None
        self._packed = self._scales_zeros = None
        kg = int4_kernel_group(self.group_size, self.in_features, self.out_features)
        perm = self._contiguous_order()
        if kg is None or perm is None:
            return
        q = self.codes()[:, perm]  # [out, in] codes in kernel column order
        src_group = (torch.arange(self.in_features // kg) * kg) // self.group_size  # kernel group -> our group
        packed = int4_pack(q)
        layout = Int4Layout(self.out_features, self.in_features)
        if not layout.verify(packed, q):
            return
        self._packed = packed
        self._scales_zeros = int4_scales_and_zeros(self.scale[:, src_group], self.zeros_full()[:, src_group], ACT_DTYPE)
        self._perm = None if self.g_idx is None else perm
        self._kernel_group = kg
        self.__dict__["_fast"] = (packed, kg, self._scales_zeros, self._perm, self.bias)
        self._layout = layout
        self.qweight = None  # torch's layout is the one copy; the portable layout is rebuilt on save

    def _runtime_codes(self) -> torch.Tensor:
        if self._packed is not None:
            assert self._layout is not None
            return self._layout.unpack(self._packed)  # kernel column order
        return super()._runtime_codes()

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        if self.qweight is None:
            self._packed = self._scales_zeros = None
            self._layout = None
            self.__dict__["_fast"] = None
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self._packed is None or self._scales_zeros is None:
            return super()._matmul(x2)
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
