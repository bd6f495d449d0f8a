"""Shared plumbing of the quantized linears: spec checks, bias, flattening, storage accounting."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from slimlm import kernels
from slimlm.models.modules import SwappableLinear
from slimlm.quant.linear.autograd import frozen_linear, kernels_allowed, needs_input_grad
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import CheckpointError, SlimlmError
from slimlm.utils.memory import module_nbytes


def n_groups(in_features: int, group_size: int) -> int:
    return -(-in_features // group_size)


def group_index(in_features: int, group_size: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """[in] int64 group of each input column (``g_idx`` or ``i // group_size``)."""
    if g_idx is not None:
        return g_idx.long()
    return torch.arange(in_features) // group_size


def dequantize_grouped(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | float,
                       g: torch.Tensor) -> torch.Tensor:
    """``(q - zero[:, g]) * scale[:, g]`` in float32, the exact math of ``QuantizedWeight.dequantize``.

    Contiguous equal groups (no act-order) broadcast over ``[out, groups, size]`` instead of
    gathering ``[out, in]`` scales: the same products, ~3x faster (a training backward runs it per call).
    """
    out, inp = q.shape
    ng = scale.shape[1]
    if ng and inp % ng == 0 and torch.equal(g, torch.arange(inp) // (inp // ng)):
        qf = q.float().view(out, ng, inp // ng)
        if not isinstance(zero, float):
            qf = qf - zero.float().unsqueeze(-1)
        elif zero:
            qf = qf - zero
        return (qf * scale.float().unsqueeze(-1)).view(out, inp)
    z = zero if isinstance(zero, float) else zero.float()[:, g]
    return (q.float() - z) * scale.float()[:, g]


def check_qweight(qw: QuantizedWeight, bits: tuple[int, ...], where: str) -> None:
    if qw.bits not in bits:
        raise SlimlmError(f"{where} takes {'/'.join(map(str, bits))}-bit weights, got {qw.bits}-bit")
    out, inp = qw.shape
    ng = n_groups(inp, qw.group_size)
    if tuple(qw.scale.shape) != (out, ng) or tuple(qw.zero.shape) != (out, ng):
        raise SlimlmError(f"{where}: scale/zero must be [{out}, {ng}], got {tuple(qw.scale.shape)} / {tuple(qw.zero.shape)}")
    if qw.g_idx is not None:
        gi = qw.g_idx.long()
        if gi.shape != (inp,) or (inp and (int(gi.min()) < 0 or int(gi.max()) >= ng)):
            raise SlimlmError(f"{where}: g_idx must be [{inp}] with values in [0, {ng})")


def spec_int(spec: dict[str, Any], key: str, kind: str) -> int:
    if key not in spec:
        raise CheckpointError(f"{kind} spec is missing {key!r} (has {sorted(spec)})")
    return int(spec[key])


DENSE_ROWS = 256  # crossover measured with benchmarks-style timing of int4/int8 kernels vs dequant + fp32 GEMM


class QuantLinearBase(SwappableLinear):
    """Common bias handling and forward plumbing: subclasses implement ``_matmul(x2: [M, in]) -> [M, out]``."""

    bias: torch.Tensor | None
    _dense: torch.Tensor | None  # dense copy kept by _dense_matmul when cache_dense is set
    cache_dense = False
    # weight-only kinds: float32 calls of at least DENSE_ROWS rows (prefill, eval, calibration) de-quantize
    # once and run the fp32 GEMM: fp32 math for an fp32 model, and faster than torch's int4/int8 kernels
    # (bf16 activations) at that size (measured 1.5-2x at 1,024-4,096 rows, AVX2 Zen 1)
    dense_large_fp32 = False

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if bias is not None:
            if bias.shape != (out_features,):
                raise SlimlmError(f"bias must be [{out_features}], got {tuple(bias.shape)}")
            self.register_buffer("bias", bias.detach().float().clone())
        else:
            self.bias = None

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    # --- decode kernels (slimlm.kernels.qgemv) ---------------------------------------------------
    def _set_decode_spec(self, codes: torch.Tensor | None, zero: torch.Tensor | None) -> None:
        """Build the decode kernels' spec from codes in their layout (int8 signed / packed 4-bit) and
        the zero in the codes' convention; ``None`` codes, act-order or an unusable shape clears it."""
        spec = None
        scale, group = getattr(self, "scale", None), getattr(self, "group_size", None)
        if (codes is not None and isinstance(scale, torch.Tensor) and isinstance(group, int)
                and getattr(self, "g_idx", None) is None and kernels.supported()[0]):
            spec = kernels.quant_spec(codes, self.bias, scale, zero, group, self.in_features)
        self.__dict__["_decode"] = spec

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_decode"] = None  # stale until process_after_loading() runs again
        super()._load_from_state_dict(*args, **kwargs)

    def kernel_rows(self) -> int:
        """Calls of at most this many rows take the decode kernel (GGUFLinear: more in serving steps)."""
        return kernels.SMALL_ROWS

    def _decode_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """The decode kernel for a few rows of x (activations rounded to int8, see qgemv.cpp), else None."""
        spec = self.__dict__.get("_decode")
        if spec is None or x.numel() > self.kernel_rows() * self.in_features or not kernels_allowed():
            return None
        return kernels.qlinear_rows(x, spec)

    def _dense_matmul(self, x2: torch.Tensor) -> torch.Tensor:
        """De-quantize and run a bf16/fp32 matmul; keeps the dense copy when ``cache_dense`` is set."""
        _dense = getattr(self, "_dense", None)
        dt = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16) else torch.float32
        if _dense is not None and _dense.dtype == dt:
            w = _dense
        else:
            w = self.dense_weight().to(dt)
            if self.cache_dense:
                self._dense = w
        return F.linear(x2.to(dt), w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out] in x's dtype; decode-size calls take slimlm's qgemv kernel
        if needs_input_grad(x):  # training: this math, backward through the de-quantized weight
            return frozen_linear(self, x)
        y = self._decode_forward(x)
        if y is not None:
            return y
        if self.dense_large_fp32 and x.dtype == torch.float32 and x.numel() >= DENSE_ROWS * self.in_features:
            w = self.__dict__.get("_pinned_dense")  # [out, in] float32 while pinned
            w = self.dense_weight() if w is None else w
            return F.linear(x, w, None if self.bias is None else self.bias.float())
        return self._forward(x)

    def pin_dense_weight(self, on: bool) -> None:
        """Keep the de-quantized fp32 weight for large fp32 calls until unpinned (the calibration driver
        runs each layer over many batches: one de-quantization per layer instead of one per batch)."""
        if on and self.dense_large_fp32:
            self.__dict__["_pinned_dense"] = self.dense_weight()
        else:
            self.__dict__.pop("_pinned_dense", None)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every call the decode kernel does not take (subclasses put their fast paths here)."""
        x2 = x.reshape(-1, self.in_features)  # [M, in]
        y = self._matmul(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ dense_weight().T + bias`` in float32: the oracle the kernel paths are tested against."""
        y = F.linear(x.float(), self.dense_weight(), None if self.bias is None else self.bias.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, spec={self.spec()}"


def persistent_nbytes(module: torch.nn.Module) -> int:
    """Bytes of what ``state_dict()`` would save (``numel * element_size`` of every tensor)."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def runtime_nbytes(module: torch.nn.Module) -> int:
    """Bytes held in memory now (see :func:`slimlm.utils.memory.module_nbytes`): parameters, all buffers
    and the runtime copies kept in attributes (decode specs, kernel tuples), each storage once."""
    return module_nbytes(module)
