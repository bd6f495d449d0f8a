"""int8 x int8 linears: SmoothQuant W8A8 and LLM.int8() with fp outlier columns.

``W8A8Linear`` (SmoothQuant; the smoothing scales are already folded into the weight and the preceding
norm by the method): storage ``weight`` int8 ``[out, in]`` (code - 128), ``scale`` float32 ``[out, 1]``,
``zero`` int8 ``[out, 1]`` (code - 128, asymmetric only). Forward: per-token dynamic symmetric int8
``x ~ xq * xs`` (``xs = absmax / 127``), ``acc = xq @ weight.T`` with ``torch._int_mm`` (int32, exact;
int64 fallback), ``y = (acc - rowsum(xq) * zero) * xs * scale``.

``Int8OutlierLinear`` (LLM.int8()): the method picks outlier input columns (activation magnitude above
the threshold, 6.0); storage ``weight`` int8 ``[out, in]`` with those columns quantized as zero,
``scale`` float32 ``[out, 1]``, ``outlier_cols`` int64 ``[k]`` and ``weight_outlier`` ``[out, k]``
(float32, or bf16 with ``outlier_dtype="bfloat16"``). Forward: the regular columns as in W8A8 (outlier
activations zeroed before the per-token quantization), plus ``x[:, cols] @ weight_outlier.T`` in float.
"""

from __future__ import annotations

from typing import Any

import torch

from slimlm.models.modules import register_linear_kind
from slimlm.quant.kernels import int_mm, quantize_per_token_int8
from slimlm.quant.linear.base import QuantLinearBase, check_qweight, spec_int
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import SlimlmError


def _int8_codes(qw: QuantizedWeight, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-channel 8-bit QuantizedWeight -> (weight int8 [out, in], zero int8 [out, 1] or None)."""
    check_qweight(qw, (8,), where)
    if qw.scale.shape[1] != 1 or qw.g_idx is not None:
        raise SlimlmError(f"{where} needs per-channel weights (one group per row), got {qw.scale.shape[1]} groups")
    w = (qw.qweight.to(torch.int16) - 128).to(torch.int8)
    if qw.symmetric:
        return w, None
    return w, (qw.zero.to(torch.int16) - 128).to(torch.int8)


class _Int8ActBase(QuantLinearBase):
    weight: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor | None

    def _int8_part(self, x2: torch.Tensor) -> torch.Tensor:
        """``x2: [M, in]`` -> float32 ``[M, out]`` through per-token int8 activations and ``_int_mm``."""
        xq, xs = quantize_per_token_int8(x2)  # [M, in] int8, [M, 1]
        acc = int_mm(xq, self.weight.t())  # [M, out] int32
        if self.zero is not None:
            acc = acc - xq.to(torch.int32).sum(dim=-1, keepdim=True) * self.zero.to(torch.int32).t()
        return acc.float() * xs * self.scale.float().t()

    def _int8_dense(self) -> torch.Tensor:
        zero = 0.0 if self.zero is None else self.zero.float()
        return (self.weight.float() - zero) * self.scale.float()  # [out, in] float32


@register_linear_kind
class W8A8Linear(_Int8ActBase):
    """SmoothQuant W8A8: int8 per-channel weights, dynamic per-token int8 activations, int32 accumulate."""

    kind = "w8a8"

    def __init__(self, in_features: int, out_features: int, symmetric: bool = True,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        self.symmetric = symmetric
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float32))
        self.register_buffer("zero", None if symmetric else torch.zeros(out_features, 1, dtype=torch.int8))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, bias: torch.Tensor | None = None) -> W8A8Linear:
        """Build from a per-channel 8-bit :class:`QuantizedWeight` (symmetric or asymmetric)."""
        w, z = _int8_codes(qw, "W8A8Linear")
        out, inp = qw.shape
        mod = cls(inp, out, qw.symmetric, bias)
        with torch.no_grad():
            mod.weight.copy_(w)
            mod.scale.copy_(qw.scale.float())
            if z is not None and mod.zero is not None:
                mod.zero.copy_(z)
        return mod

    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> W8A8Linear:
        return cls(in_features, out_features, bool(spec.get("symmetric", True)),
                   torch.zeros(out_features) if bias else None)

    def spec(self) -> dict[str, Any]:
        return {"bits": 8, "symmetric": self.symmetric, "activations": "int8-per-token"}

    def dense_weight(self) -> torch.Tensor:
        return self._int8_dense()

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        return self._int8_part(x2)


@register_linear_kind
class Int8OutlierLinear(_Int8ActBase):
    """LLM.int8(): int8 matmul for regular input columns, float matmul for the outlier columns."""

    kind = "int8_outlier"
    outlier_cols: torch.Tensor
    weight_outlier: torch.Tensor

    def __init__(self, in_features: int, out_features: int, n_outliers: int, outlier_dtype: str = "float32",
                 bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        if outlier_dtype not in ("float32", "bfloat16"):
            raise SlimlmError(f"outlier_dtype must be float32 or bfloat16, got {outlier_dtype!r}")
        self.outlier_dtype = outlier_dtype
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, 1, dtype=torch.float32))
        self.zero = None
        self.register_buffer("outlier_cols", torch.zeros(n_outliers, dtype=torch.int64))
        self.register_buffer("weight_outlier", torch.zeros(out_features, n_outliers, dtype=getattr(torch, outlier_dtype)))

    @classmethod
    def from_quantized(cls, qw: QuantizedWeight, cols: torch.Tensor, w_out: torch.Tensor,
                       bias: torch.Tensor | None = None, outlier_dtype: str = "float32") -> Int8OutlierLinear:
        """``qw``: symmetric per-channel int8 of the weight with outlier columns zeroed;
        ``cols``: [k] outlier input columns; ``w_out``: [out, k] their float weights."""
        w, z = _int8_codes(qw, "Int8OutlierLinear")
        if z is not None:
            raise SlimlmError("Int8OutlierLinear needs symmetric int8 weights")
        out, inp = qw.shape
        cols = cols.long().flatten()
        if w_out.shape != (out, cols.numel()):
            raise SlimlmError(f"outlier weights must be [{out}, {cols.numel()}], got {tuple(w_out.shape)}")
        if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= inp or cols.unique().numel() != cols.numel()):
            raise SlimlmError(f"outlier columns must be distinct indices in [0, {inp})")
        mod = cls(inp, out, cols.numel(), outlier_dtype, bias)
        with torch.no_grad():
            w = w.clone()
            w[:, cols] = 0  # these columns are computed in float
            mod.weight.copy_(w)
            mod.scale.copy_(qw.scale.float())
            mod.outlier_cols.copy_(cols)
            mod.weight_outlier.copy_(w_out)
        return mod

    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> Int8OutlierLinear:
        return cls(in_features, out_features, spec_int(spec, "n_outliers", cls.kind),
                   str(spec.get("outlier_dtype", "float32")), torch.zeros(out_features) if bias else None)

    def spec(self) -> dict[str, Any]:
        return {"bits": 8, "n_outliers": int(self.outlier_cols.numel()), "outlier_dtype": self.outlier_dtype}

    def dense_weight(self) -> torch.Tensor:
        w = self._int8_dense()
        w[:, self.outlier_cols] = self.weight_outlier.float()
        return w

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # x2: [M, in]
        cols = self.outlier_cols
        xr = x2.float().clone()
        xr[:, cols] = 0.0
        y = self._int8_part(xr)  # [M, out]
        if cols.numel():
            y = y + x2[:, cols].float() @ self.weight_outlier.float().t()
        return y
