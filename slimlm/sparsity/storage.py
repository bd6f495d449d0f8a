"""Sparse storage that makes the checkpoint smaller, with a CPU execution path chosen by speed.

``SparseLinear`` (kind ``"sparse"``) stands in for a pruned ``nn.Linear``. Checkpoint layouts:

* ``format="bitmask"`` (unstructured): ``mask`` uint8 ``[out, ceil(in/8)]`` (bit ``j % 8`` of byte
  ``j // 8`` = input column ``j`` kept) + the kept values in row-major order ``[nnz]``;
* ``format="nm"`` (N:M): ``values [out, in*N/M]`` + the position of each kept value inside its group
  of ``M``, packed at 2 bits (M = 4), 4 bits (M <= 16) or 8 bits per index: ``indices`` uint8.

Values are floats, or (``bits > 0``: joint SparseGPT + quantization) integer codes packed into
uint8 (``qvalues``) with per-row-group ``scales`` float32 / ``zeros`` uint8 ``[out, groups]``:
``w = (q - zero) * scale``. At 50% unstructured, fp32 -> 16 + 1 = 17 bits per weight (vs 32); 2:4
fp32 -> 16 + 1; 4-bit codes -> 2 + 1 + scales.

Execution (``process_after_loading``): measured on the 2-core AVX2 machine (see
``benchmarks/sparsity.py --only kernels`` and docs/pruning.md), ``torch`` CSR matmul only beats a
dense ``F.linear`` at ~95% sparsity and above; below that the dense weight is rebuilt once at load
time (*sparse on disk, dense at run time*). ``exec="auto"`` applies that threshold,
``"dense"``/``"csr"`` force a path.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from slimlm import kernels
from slimlm.models.modules import SwappableLinear, register_linear_kind
from slimlm.utils.errors import CheckpointError, ConfigError

CSR_MIN_SPARSITY = 0.95  # measured crossover: below this, dense F.linear wins on this CPU


# --- bit packing --------------------------------------------------------------------------------
def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., n]`` in [0, 2^bits) along the last dim, little-end first, into uint8."""
    per = 8 // bits
    n = codes.shape[-1]
    pad = (-n) % per
    c = F.pad(codes.to(torch.int32), (0, pad)).reshape(*codes.shape[:-1], -1, per)
    shifts = torch.arange(per, dtype=torch.int32) * bits
    return (c << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: uint8 ``[..., ceil(n*bits/8)]`` -> int64 ``[..., n]``."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], -1)[..., :n].long()


def index_bits(m: int) -> int:
    return 2 if m <= 4 else 4 if m <= 16 else 8


def code_bits(bits: int) -> int:
    """Storage width of a quantized code: 2, 4 or 8 bits per code (codes never straddle bytes)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


# --- the module ---------------------------------------------------------------------------------
@register_linear_kind
class SparseLinear(SwappableLinear):
    """A pruned linear stored compactly; ``forward`` runs dense or CSR (see module docstring)."""

    kind = "sparse"
    mask: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    qvalues: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: str, nnz: int,
                 n: int = 0, m: int = 0, bits: int = 0, group_size: int = 0, exec_mode: str = "auto",
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        if fmt not in ("bitmask", "nm"):
            raise ConfigError(f"unknown sparse format {fmt!r}; use 'bitmask' or 'nm'")
        if exec_mode not in ("auto", "dense", "csr"):
            raise ConfigError(f"unknown sparse exec mode {exec_mode!r}; use auto, dense or csr")
        self.in_features, self.out_features = in_features, out_features
        self.fmt, self.n, self.m, self.bits, self.group_size, self.exec_mode = fmt, n, m, bits, group_size, exec_mode
        if fmt == "nm":
            if not (0 < n < m) or in_features % m:
                raise ConfigError(f"N:M storage needs 0 < N < M and in_features % M == 0, got {n}:{m}, in={in_features}")
            nnz = out_features * in_features // m * n
            per_row = in_features // m * n
            self.register_buffer("indices", torch.zeros(out_features, math.ceil(per_row * index_bits(m) / 8),
                                                        dtype=torch.uint8))
        else:
            self.register_buffer("mask", torch.zeros(out_features, math.ceil(in_features / 8), dtype=torch.uint8))
        self.nnz = nnz
        if bits:
            gs = group_size if 0 < group_size < in_features else in_features
            groups = math.ceil(in_features / gs)
            self.group_size = gs
            self.register_buffer("qvalues", torch.zeros(math.ceil(nnz * code_bits(bits) / 8), dtype=torch.uint8))
            self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float32))
            self.register_buffer("zeros", torch.zeros(out_features, groups, dtype=torch.uint8))
        else:
            self.register_buffer("values", torch.zeros(nnz, dtype=dtype))
        self.bias: torch.nn.Parameter | None = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None
        self._dense: torch.Tensor | None = None  # runtime layout (not in the checkpoint)
        self._csr: torch.Tensor | None = None
        self.path = "dense"
        self.sparsity = 0.0

    # --- SwappableLinear ------------------------------------------------------------------------
    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> SparseLinear:
        try:
            return cls(in_features, out_features, bias, spec["format"], int(spec.get("nnz", 0)),
                       int(spec.get("n", 0)), int(spec.get("m", 0)), int(spec.get("bits", 0)),
                       int(spec.get("group_size", 0)), spec.get("exec", "auto"),
                       getattr(torch, spec.get("dtype", "float32")))
        except KeyError as e:
            raise CheckpointError(f"sparse linear spec lacks {e.args[0]!r}") from None

    def spec(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": self.fmt, "nnz": self.nnz, "exec": self.exec_mode}
        if self.fmt == "nm":
            out.update(n=self.n, m=self.m)
        if self.bits:
            out.update(bits=self.bits, group_size=self.group_size)
        else:
            out["dtype"] = str(self.values.dtype).replace("torch.", "")
        return out

    @classmethod
    @torch.no_grad()
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None, pattern: tuple[int, int] | None = None,
                   codes: tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int] | None = None,
                   exec_mode: str = "auto") -> SparseLinear:
        """Compress a pruned ``weight [out, in]`` (zeros = pruned).

        ``codes = (q [out, in] int, scales [out, groups], zeros [out, groups], bits, group_size)``
        stores quantized values instead of floats.
        """
        out_f, in_f = weight.shape
        w = weight.detach()
        n, m = pattern if pattern is not None else (0, 0)
        if pattern is not None:
            g = w.reshape(out_f, in_f // m, m)
            nz = (g != 0).sum(-1)
            if bool((nz > n).any()):
                raise ConfigError(f"weight does not follow the {n}:{m} pattern")
            # kept positions: the nonzeros, padded with the first zero slots to exactly n per group
            key = (g != 0).float() * 2 - torch.arange(m).float() / m  # nonzeros first, stable order
            pos = torch.topk(key, n, dim=-1).indices.sort(-1).values  # [out, groups, n]
            keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, pos, True).reshape(out_f, in_f)
        else:
            keep = w != 0
        nnz = int(keep.sum())
        bits, gs = (codes[3], codes[4]) if codes is not None else (0, 0)
        mod = cls(in_f, out_f, bias is not None, "nm" if pattern else "bitmask", nnz, n, m, bits, gs, exec_mode,
                  dtype=w.dtype if w.is_floating_point() else torch.float32)
        if pattern is not None:
            mod.indices.copy_(pack_bits(pos.reshape(out_f, -1), index_bits(m)))
        else:
            mod.mask.copy_(pack_bits(keep.to(torch.int32), 1))
        if codes is not None:
            q, scales, zeros = codes[0], codes[1], codes[2]
            g = torch.arange(in_f) // mod.group_size
            q = torch.where(w != 0, q, zeros[:, g])  # padded N:M slots hold the code of 0
            mod.qvalues.copy_(pack_bits(q[keep].to(torch.int32), code_bits(bits)))
            mod.scales.copy_(scales.float())
            mod.zeros.copy_(zeros.to(torch.uint8))
        else:
            mod.values.copy_(w[keep])
        if bias is not None and mod.bias is not None:
            mod.bias.data.copy_(bias.detach())
        mod.process_after_loading()
        return mod

    def keep_mask(self) -> torch.Tensor:
        """Bool ``[out, in]``: the stored positions."""
        out_f, in_f = self.out_features, self.in_features
        if self.fmt == "nm":
            pos = unpack_bits(self.indices, index_bits(self.m), in_f // self.m * self.n)
            pos = pos.reshape(out_f, in_f // self.m, self.n)
            keep = torch.zeros(out_f, in_f // self.m, self.m, dtype=torch.bool).scatter_(-1, pos, True)
            return keep.reshape(out_f, in_f)
        return unpack_bits(self.mask, 1, in_f).bool()

    def dense_weight(self) -> torch.Tensor:
        keep = self.keep_mask()
        w = torch.zeros(self.out_features, self.in_features, dtype=torch.float32)
        if self.bits:
            q = unpack_bits(self.qvalues, code_bits(self.bits), self.nnz).float()
            g = (torch.arange(self.in_features) // self.group_size).unsqueeze(0).expand_as(keep)[keep]
            rows = torch.arange(self.out_features).unsqueeze(1).expand_as(keep)[keep]
            w[keep] = (q - self.zeros[rows, g].float()) * self.scales[rows, g]
        else:
            w[keep] = self.values.float()
        return w

    def process_after_loading(self) -> None:
        w = self.dense_weight()
        self.sparsity = 1.0 - float((w != 0).sum()) / max(w.numel(), 1)
        mode = self.exec_mode
        if mode == "auto":
            mode = "csr" if self.sparsity >= CSR_MIN_SPARSITY else "dense"
        self.path = mode
        if mode == "csr":
            with warnings.catch_warnings():  # "sparse CSR support is in beta"
                warnings.simplefilter("ignore", UserWarning)
                self._csr, self._dense = w.to_sparse_csr(), None
        else:
            self._dense, self._csr = w, None
        self._set_decode_spec()

    def _set_decode_spec(self) -> None:
        """The dense runtime weight as the decode kernels' spec (a plain linear's; CSR: none), served by
        :meth:`SwappableLinear.decode_spec`."""
        spec = None
        if self._dense is not None and kernels.supported()[0]:
            b = None if self.bias is None else self.bias.detach().to(self._dense.dtype)
            spec = kernels.dense_spec(self._dense, b)
        self.__dict__["_decode"] = spec

    # --- apply ----------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        if self._dense is None and self._csr is None:
            self.process_after_loading()
        if self._csr is not None:
            x2 = x.reshape(-1, self.in_features).float()  # CSR kernels run in float32
            y = torch.sparse.mm(self._csr, x2.t()).t()
            if self.bias is not None:
                y = y + self.bias.float()
            return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        assert self._dense is not None
        if self._dense.dtype != x.dtype:
            self._dense = self._dense.to(x.dtype)
            self._set_decode_spec()
        b = self.bias.to(x.dtype) if self.bias is not None else None
        return kernels.linear(x, self._dense, b)  # the GEMV kernel for a few rows, as a plain linear

    def extra_repr(self) -> str:
        pat = f"{self.n}:{self.m}" if self.fmt == "nm" else "bitmask"
        return f"in={self.in_features}, out={self.out_features}, {pat}, nnz={self.nnz}, bits={self.bits}, path={self.path}"
