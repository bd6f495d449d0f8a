"""GGUF quantized tensors run as they are: llama.cpp's Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 and K-quants.

Why: a GGUF file de-quantized to float32 takes 4-6x its size in memory and loses the low-bit speed
its users expect. ``GGUFLinear`` (kind ``gguf``) keeps each type's integers, group scales and zero
terms (``slimlm.quant.linear.gguf_blocks`` decodes the blocks) and ``GGUFEmbedding`` looks rows up in
the same storage, so a tied head and the embeddings share one copy.

Math (every type): ``w[o, i] = scale[o, g] * (q[o, i] - c0) - zs[o, g]`` in float32, ``g = i // group``,
``c0`` 8 for Q4_0 else 0, ``zs`` absent for the symmetric types: equal bit for bit to
``gguf.quants.dequantize`` (see gguf_blocks for why the operation order matches).

Storage (state dict; the layout is fixed by type and shape, so ``create`` rebuilds it):

- 4-bit types (Q4_0, Q4_1, Q4_K): ``codes`` uint8 in the decode kernels' 16-row tiles
  ``[O/16, I/8, 64]`` with ``scale``/``zs`` ``[O/16, ng, 16]`` (``slimlm.kernels.tile_int4``); when
  ``O % 16 != 0``, two codes per byte ``[O, I/2]`` (even element low) with ``[O, ng]`` terms.
- the others: ``codes`` int8 ``[O, I]`` (Q5_x, Q5_K, Q6_K, Q3_K, Q2_K one byte per weight),
  ``scale``/``zs`` float32 ``[O, ng]``.
- Q4_0/Q4_1 tiles keep ``scale``/``zs`` in fp16, as the file stores ``d`` and ``m`` (the values are
  fp16 numbers: widening them to fp32 is exact, and the kernels widen them per tile block), so
  those layers hold 20 bytes per 32 weights like the file; the K types' ``d * sc`` products are not
  fp16 numbers and stay float32.

Runtime: decode-size calls (<= 8 rows) of the group-32 types run slimlm's ``qgemv`` integer-dot
kernels on this storage directly (activations rounded to int8 per chunk, docs/runtime.md; Q4_1's
``zs`` is ``qgemv``'s zero*scale term); everything else, and the group-16 types (Q2_K, Q3_K, Q6_K),
de-quantizes and runs a float matmul in the activation dtype (fp32 calls of >= 256 rows the fp32 GEMM).

Example::

    mod = GGUFLinear.from_blocks(raw, "Q4_K", in_features=576)   # raw: uint8 [out, bytes_per_row]
    y = mod(x)                                                    # x: [..., 576]

Tests: ``.venv/bin/pytest tests/loaders/test_gguf_native.py``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimlm import kernels
from slimlm.models.modules import register_linear_kind
from slimlm.quant.linear.base import QuantLinearBase, n_groups
from slimlm.quant.linear.gguf_blocks import LAYOUTS, GGUFCodes, decode_blocks
from slimlm.utils.errors import CheckpointError

TILE = kernels.TILE_ROWS
HALF_TERMS = ("Q4_0", "Q4_1")  # types whose group terms are the file's fp16 d (and m): held in fp16 when tiled


def untile_int4(tiles: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`slimlm.kernels.tile_int4` down to codes: ``[O/16, I/8, 64]`` -> uint8 ``[O, I]``."""
    r, k, _ = tiles.shape
    t = tiles.view(r, k, TILE, 4)  # [R, k, row, j]
    codes = torch.stack([t & 0x0F, t >> 4], dim=3)  # [R, k, row, half, j]: element 8k + 4 half + j
    return codes.permute(0, 2, 1, 3, 4).reshape(r * TILE, k * 8)


def untile_rows(v: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`slimlm.kernels.tile_rows`: ``[O/16, ng, 16]`` -> ``[O, ng]``."""
    r, ng, _ = v.shape
    return v.transpose(1, 2).reshape(r * TILE, ng)


def tile_int4_np(codes: np.ndarray) -> np.ndarray:
    """Codes uint8 ``[O, I]`` (0..15) -> the tiles of :func:`slimlm.kernels.tile_int4` (numpy: ~10x
    faster than the torch version on uint8 at load; the tests check both give the same bytes)."""
    o, i = codes.shape
    q = codes.reshape(o // TILE, TILE, i // 8, 2, 4)  # [R, row, k, half, j]
    t = q[:, :, :, 0] | (q[:, :, :, 1] << 4)  # [R, row, k, j]
    return np.ascontiguousarray(t.transpose(0, 2, 1, 3)).reshape(o // TILE, i // 8, 4 * TILE)


def tile_rows_np(v: np.ndarray) -> np.ndarray:
    """Per-row terms ``[O, ng]`` -> ``[O/16, ng, 16]`` (:func:`slimlm.kernels.tile_rows`, numpy)."""
    o, ng = v.shape
    return np.ascontiguousarray(v.reshape(o // TILE, TILE, ng).transpose(0, 2, 1))


@register_linear_kind
class GGUFLinear(QuantLinearBase):
    """A linear holding one GGUF quantized type natively (see the module docstring)."""

    kind = "gguf"
    dense_large_fp32 = True
    codes: torch.Tensor
    scale: torch.Tensor
    zs: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, qtype: str, bias: torch.Tensor | None = None) -> None:
        super().__init__(in_features, out_features, bias)
        if qtype not in LAYOUTS:
            raise CheckpointError(f"GGUF type {qtype} has no native slimlm layout (native: {', '.join(LAYOUTS)})")
        block, _, group, nib, c0, has_zs = LAYOUTS[qtype]
        if in_features % block:
            raise CheckpointError(f"GGUF {qtype} rows must be a multiple of {block} values, got {in_features}")
        self.qtype, self.group_size, self.nibble, self.code_offset = qtype, group, nib, c0
        self.tiled = nib and out_features % TILE == 0
        ng = n_groups(in_features, group)
        if self.tiled:
            codes = torch.zeros(out_features // TILE, in_features // 8, 4 * TILE, dtype=torch.uint8)
            terms: tuple[int, ...] = (out_features // TILE, ng, TILE)
        elif nib:
            codes, terms = torch.zeros(out_features, in_features // 2, dtype=torch.uint8), (out_features, ng)
        else:
            codes, terms = torch.zeros(out_features, in_features, dtype=torch.int8), (out_features, ng)
        self.register_buffer("codes", codes)
        tdt = torch.float16 if self.tiled and qtype in HALF_TERMS else torch.float32  # see the module docstring
        self.register_buffer("scale", torch.ones(terms, dtype=tdt))
        self.register_buffer("zs", torch.zeros(terms, dtype=tdt) if has_zs else None)

    def kernel_rows(self) -> int:
        return kernels.kernel_rows()  # a serving step's batched decode stays on the integer-dot kernel

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_codes(cls, g: GGUFCodes, qtype: str, bias: torch.Tensor | None = None) -> GGUFLinear:
        """Build from decoded blocks (codes ``[O, I]``, terms ``[O, ng]``)."""
        out, inp = g.codes.shape
        mod = cls(inp, out, qtype, bias)
        codes, scale, zs = g.codes, g.scale, g.zs
        if mod.tiled:
            codes, scale = tile_int4_np(codes), tile_rows_np(scale)
            zs = None if zs is None else tile_rows_np(zs)
        elif mod.nibble:
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [O, I/2] even element low
        tdt = mod.scale.dtype  # fp16 terms hold the file's fp16 values exactly (HALF_TERMS)
        mod.codes = torch.from_numpy(np.ascontiguousarray(codes))
        mod.scale = torch.from_numpy(np.ascontiguousarray(scale)).to(tdt)
        mod.zs = None if zs is None else torch.from_numpy(np.ascontiguousarray(zs)).to(tdt)
        mod.process_after_loading()
        return mod

    @classmethod
    def from_blocks(cls, raw: np.ndarray, qtype: str, in_features: int, bias: torch.Tensor | None = None) -> GGUFLinear:
        """Build from a tensor's raw GGUF blocks ``uint8 [out, bytes_per_row]``."""
        return cls.from_codes(decode_blocks(raw, qtype, in_features), qtype, bias)

    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> GGUFLinear:
        if "gguf_type" not in spec:
            raise CheckpointError(f"gguf spec is missing 'gguf_type' (has {sorted(spec)})")
        return cls(in_features, out_features, str(spec["gguf_type"]), torch.zeros(out_features) if bias else None)

    def spec(self) -> dict[str, Any]:
        return {"gguf_type": self.qtype}

    def process_after_loading(self) -> None:
        """The decode kernels read the storage as it is (group-32 types); no copy of the codes is made."""
        spec = None
        if self.group_size % kernels.QBLOCK == 0 and self.in_features % kernels.QBLOCK == 0 and kernels.supported()[0]:
            zs, scale = self.zs, self.scale
            if self.code_offset:  # Q4_0: qgemv's zero*scale term is 8 * d (exact: d is an fp16 value)
                zs = self.scale * float(self.code_offset)
                if not bool(torch.isfinite(zs).all()):  # 8 * d past fp16's range: float32 terms
                    scale, zs = scale.float(), scale.float() * float(self.code_offset)
            b = kernels._EMPTY if self.bias is None else self.bias.float().contiguous()
            spec = (self.codes, b, scale, kernels._EMPTY if zs is None else zs,
                    torch.tensor([self.group_size]))
        self.__dict__["_decode"] = spec

    # --- math -----------------------------------------------------------------------------------
    def _terms(self, rows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(codes [n, I] as stored integers, scale [n, ng], zs [n, ng] or None) of ``rows`` (all when None)."""
        def pick(v: torch.Tensor) -> torch.Tensor:
            if self.tiled:
                return untile_rows(v) if rows is None else v[rows // TILE, :, rows % TILE]
            return v if rows is None else v[rows]

        if self.tiled:
            if rows is None:
                q = untile_int4(self.codes)
            else:
                t = self.codes.view(self.codes.shape[0], -1, TILE, 4)[rows // TILE, :, rows % TILE]  # [n, I/8, 4]
                q = torch.stack([t & 0x0F, t >> 4], dim=2).reshape(-1, self.in_features)
        elif self.nibble:
            p = self.codes if rows is None else self.codes[rows]
            q = torch.stack([p & 0x0F, p >> 4], dim=-1).reshape(-1, self.in_features)
        else:
            q = self.codes if rows is None else self.codes[rows]
        return q, pick(self.scale).float(), None if self.zs is None else pick(self.zs).float()

    def dense_rows(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """De-quantized rows ``[n, I]`` float32 (``rows`` int64 [n]; all rows when None)."""
        q, scale, zs = self._terms(rows)
        n, g = q.shape[0], self.group_size
        qf = q.view(n, -1, g).float()  # [n, ng, group]
        if self.code_offset:
            qf = qf - float(self.code_offset)
        w = qf * scale.unsqueeze(-1)
        if zs is not None:
            w = w - zs.unsqueeze(-1)
        return w.view(n, self.in_features)

    def dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole matrix ``[out, in]`` in float32 or bf16 (rounded from the float32 values): slimlm's
        de-quantization kernel (kernels/gguf.cpp, the same float32 operations) where built, else torch."""
        if kernels.load() is not None and dtype in (torch.float32, torch.bfloat16):
            return torch.ops.slimlm_gguf.dequant(  # type: ignore[no-any-return]
                self.codes, self.scale, kernels._EMPTY if self.zs is None else self.zs, self.out_features,
                self.in_features, self.group_size, self.code_offset, dtype is torch.bfloat16)
        return self.dense_rows(None).to(dtype)

    def dense_weight(self) -> torch.Tensor:
        return self.dense()  # [out, in] float32

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        # x2: [M, in]; prefill-size calls: de-quantize straight into the activation dtype (bf16 -> AMX/
        # AVX-512 BF16 GEMM), then one matmul
        dt = x2.dtype if x2.dtype in (torch.float32, torch.bfloat16) else torch.float32
        return F.linear(x2.to(dt), self.dense(dt))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf_type={self.qtype}"


class GGUFEmbedding(nn.Module):
    """Token embeddings kept in a GGUF quantized type: a lookup de-quantizes only the rows it reads.

    ``table`` is a :class:`GGUFLinear` ``[vocab, hidden]`` (the tied ``lm_head`` when the model ties
    them: one copy serves both). ``weight`` is an empty tensor of the compute dtype, so code asking the
    embedding for its dtype keeps working; it holds no values.
    """

    _dtype_probe: torch.Tensor

    def __init__(self, table: GGUFLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.out_features, table.in_features
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        return self._dtype_probe

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [...] int64 -> [..., hidden] in the compute dtype
        flat = ids.reshape(-1).long()
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= self.num_embeddings):
            raise IndexError(f"token id out of range [0, {self.num_embeddings})")
        rows = self.table.dense_rows(flat)
        return rows.to(self._dtype_probe.dtype).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf_type={self.table.qtype}"
