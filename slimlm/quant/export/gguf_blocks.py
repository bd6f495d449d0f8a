"""GGUF block packing of QuantizedWeights (so llama.cpp runs slimlm-quantized models bit for bit).

Exact block layouts (32 weights per block along the input dim, rows = output channels):

- ``Q8_0`` (34 bytes): float16 ``d`` + 32 int8 ``qs``; ``w = qs * d``. From an 8-bit *symmetric*
  group-32 weight: ``qs = q - 128``, ``d = scale``.
- ``Q4_0`` (18 bytes): float16 ``d`` + 16 bytes, byte ``j`` = element ``j`` (low nibble) | element
  ``j+16`` (high); ``w = (q - 8) * d``. From a 4-bit *symmetric* group-32 weight (zero 8): ``q`` as is.
- ``Q4_1`` (20 bytes): float16 ``d``, float16 ``m`` + the Q4_0 nibbles; ``w = q * d + m``. From a 4-bit
  *asymmetric* group-32 weight: ``d = scale``, ``m = -zero * scale``.

``d`` and ``m`` are float16 in GGUF: the values equal ``QuantizedWeight.dequantize()`` computed with
those rounded constants (exactly, when the scales are float16-representable). Any other weight (other
bits, group size or act-order g_idx) takes the fallback: de-quantize and re-quantize with
``gguf.quants.quantize`` to the requested type (lossy, reported by :func:`gguf_blocks`).
Tested by reading back with ``gguf.quants.dequantize``: ``.venv/bin/pytest tests/quant/test_export.py -k gguf``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from slimlm.quant.export.common import is_default_g_idx, split_model
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import SlimlmError

Q = gguf.GGMLQuantizationType
BLOCK = 32


def _f16_bytes(t: torch.Tensor) -> np.ndarray:
    """[out, nb] float -> [out, nb, 2] uint8 (little-endian float16)."""
    a = t.float().numpy().astype(np.float16)
    if not np.all(np.isfinite(a)):
        raise SlimlmError("a scale does not fit GGUF's float16 block constant")
    return a.view(np.uint8).reshape(*a.shape, 2)


def _nibbles(q: torch.Tensor) -> np.ndarray:
    """[out, nb, 32] codes 0..15 -> [out, nb, 16] bytes (element j low nibble, j+16 high)."""
    qn = q.to(torch.uint8).numpy()
    return qn[..., :16] | (qn[..., 16:] << 4)


def exact_type(qw: QuantizedWeight) -> Any:
    """The GGUF type holding ``qw`` exactly (Q8_0 / Q4_0 / Q4_1), or None."""
    if qw.group_size != BLOCK or qw.shape[1] % BLOCK or not is_default_g_idx(qw):
        return None
    if qw.bits == 8 and qw.symmetric:
        return Q.Q8_0
    if qw.bits == 4:
        return Q.Q4_0 if qw.symmetric else Q.Q4_1
    return None


def pack_exact(qw: QuantizedWeight, qtype: Any) -> np.ndarray:
    """Pack ``qw`` into ``qtype`` blocks without re-quantizing: uint8 ``[out, in/32 * type_size]``."""
    if exact_type(qw) != qtype:
        raise SlimlmError(f"a {qw.bits}-bit {'symmetric' if qw.symmetric else 'asymmetric'} group-{qw.group_size} "
                          f"weight cannot be stored exactly as {Q(qtype).name}")
    out, inp = qw.shape
    nb = inp // BLOCK
    q = qw.qweight.reshape(out, nb, BLOCK)
    d = _f16_bytes(qw.scale)  # [out, nb, 2]
    if qtype == Q.Q8_0:
        qs = (q.to(torch.int16) - 128).to(torch.int8).numpy().view(np.uint8)
        blocks = np.concatenate([d, qs], axis=-1)
    elif qtype == Q.Q4_0:
        blocks = np.concatenate([d, _nibbles(q)], axis=-1)
    else:  # Q4_1
        m = _f16_bytes(-qw.zero.float() * qw.scale.float())
        blocks = np.concatenate([d, m, _nibbles(q)], axis=-1)
    return np.ascontiguousarray(blocks.reshape(out, -1))


def gguf_blocks(qw: QuantizedWeight, qtype: Any = None) -> tuple[np.ndarray, Any, bool]:
    """``(blocks uint8 [out, bytes_per_row], type, exact)``: the exact packing when ``qw`` fits
    ``qtype`` (or, with ``qtype=None``, any exact type), else re-quantize with ``gguf.quants.quantize``."""
    ex = exact_type(qw)
    if ex is not None and (qtype is None or Q(qtype) == ex):
        return pack_exact(qw, ex), ex, True
    qtype = Q(qtype if qtype is not None else (Q.Q8_0 if qw.bits > 4 else Q.Q4_0))
    if qw.shape[1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        raise SlimlmError(f"rows of {qw.shape[1]} values are not whole {qtype.name} blocks")
    data = np.ascontiguousarray(qw.dequantize().numpy(), dtype=np.float32)
    return np.asarray(gguf.quants.quantize(data, qtype)), qtype, False


def gguf_raw_from_model(model: Any, fallback: Any = None) -> tuple[dict[str, tuple[np.ndarray, Any, tuple[int, ...]]], dict[str, bool]]:
    """``raw`` for ``slimlm.loaders.gguf_writer.write_gguf``: ``{hf weight name: (blocks, type, shape)}``
    for every quantized linear of ``model``, and ``{hf weight name: exact?}``."""
    parts = split_model(model)
    raw: dict[str, tuple[np.ndarray, Any, tuple[int, ...]]] = {}
    exact: dict[str, bool] = {}
    for name, qw in parts.quantized.items():
        blocks, qtype, ok = gguf_blocks(qw, fallback if exact_type(qw) is None else None)
        raw[name + ".weight"] = (blocks, qtype, qw.shape)
        exact[name + ".weight"] = ok
    return raw, exact


def export_gguf_quantized(lm: Any, out: str | Path, default_type: str = "Q8_0", fallback: Any = None,
                          overwrite: bool = False) -> dict[str, str]:
    """Write ``lm`` (a LoadedModel) as GGUF, its quantized linears as pre-packed blocks.

    Returns ``{hf_name: GGUF type}``. Unquantized 2-D weights are encoded as ``default_type`` by the writer.
    """
    from slimlm.loaders.gguf_writer import export_gguf

    raw, _ = gguf_raw_from_model(lm.model, fallback)
    return export_gguf(lm, out, default_type=default_type, overwrite=overwrite, raw=raw)
