"""Resident bytes of a model's weights per storage format, from shapes alone.

Each format names the runtime layout slimlm's loader ends up holding (``process_after_loading`` with
slimlm's kernels built), counted as :func:`slimlm.utils.memory.module_nbytes` counts a loaded model
(every storage once: codes, scales, the kernels' copies of scales and zero terms). Per linear
``[out, in]`` with ``n = out * in`` weights and ``ng`` groups per row:

=============  ===========================================================================================
``fp32/bf16``  ``4n`` / ``2n``
``int8``       per-channel symmetric (``Int8WeightLinear``): ``n`` codes + per row fp32 scale + bf16 copy (6 B)
``intB[-gG]``  B in 2..7 bits, asymmetric, group G (default 128). B <= 4 with ``out % 16 == 0``: 4-bit tiles
               ``n/2`` (so 2- and 3-bit hold half a byte per weight at run time too) + 13 B per group
               (fp32 scale, uint8 zero, the kernel's tiled fp32 scale and zero*scale); B >= 5: int8
               codes ``n`` + 9 B per group
``nf4``        QLoRA NF4, block 64, double quantization: ``n/2`` + 1 B per block + fp32 per 256 blocks
``Q4_K`` ...   a GGUF type run natively (``GGUFLinear``): 4-bit types ``n/2``, others ``n`` codes, plus fp32
               scale (and zero term) per group; Q4_0's decode kernel adds its fp32 zero*scale term
``native``     what the checkpoint stores: GGUF types as in the file, a slimlm output's module kinds
=============  ===========================================================================================

Quantized formats quantize the decoder's linears; ``lm_head`` stays float (the methods' default
``ignore: [lm_head]``), embeddings and norms stay in the float dtype (GGUF keeps its embedding
type). Biases of quantized linears are fp32. Tests: ``tests/plan/test_memory.py`` compares these
counts with ``module_nbytes`` of models really quantized.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from slimlm.plan.shapes import LinearShape, ModelShape
from slimlm.utils.errors import SlimlmError

FLOAT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_INTX = re.compile(r"^int([2-7])(?:-g(\d+))?$")
TILE_ROWS = 16  # slimlm.kernels.TILE_ROWS: rows per 4-bit tile
QBLOCK = 32  # slimlm.kernels.QBLOCK: the qgemv kernels' input block


def gguf_layouts() -> dict[str, tuple[int, int, int, bool, int, bool]]:
    from slimlm.quant.linear.gguf_blocks import LAYOUTS

    return LAYOUTS


@dataclass(frozen=True)
class WeightFormat:
    name: str
    kind: str  # "float" | "int8" | "intx" | "nf4" | "gguf" | "native"
    bits: int = 16
    group_size: int = 128
    gguf_type: str = ""

    @property
    def quantized(self) -> bool:
        return self.kind not in ("float",)


def known_formats() -> list[str]:
    return ["native", "fp32", "bf16", "int8", "int4", "int3", "int2", "nf4", *gguf_layouts()]


def parse_format(name: str) -> WeightFormat:
    """``fp32``, ``bf16``, ``int8``, ``int4`` (g128), ``int3-g64``, ``nf4``, a GGUF type (``Q4_K``), ``native``."""
    if name in ("fp32", "bf16"):
        return WeightFormat(name, "float", bits=32 if name == "fp32" else 16)
    if name == "int8":
        return WeightFormat(name, "int8", bits=8, group_size=-1)
    if name == "nf4":
        return WeightFormat(name, "nf4", bits=4, group_size=64)
    if name == "native":
        return WeightFormat(name, "native")
    if name.upper() in gguf_layouts():
        return WeightFormat(name.upper(), "gguf", gguf_type=name.upper())
    m = _INTX.match(name)
    if m:
        g = int(m.group(2) or 128)
        if g < QBLOCK or g % QBLOCK:
            raise SlimlmError(f"format {name!r}: the group size must be a multiple of {QBLOCK}")
        return WeightFormat(name, "intx", bits=int(m.group(1)), group_size=g)
    raise SlimlmError(f"unknown weight format {name!r}; known: {', '.join(known_formats())} (or intB-gG, B 2-7)")


def linear_bytes(lin: LinearShape, fmt: WeightFormat, float_bytes: int) -> int:
    """Resident bytes of one linear held in ``fmt`` (float parts in ``float_bytes`` per value)."""
    o, i, n = lin.out_features, lin.in_features, lin.numel
    if fmt.kind == "float":
        return (n + (o if lin.bias else 0)) * FLOAT_BYTES[fmt.name if fmt.name in FLOAT_BYTES else "fp32"]
    bias = 4 * o if lin.bias else 0
    if fmt.kind == "int8":
        return n + 6 * o + bias
    if fmt.kind == "intx":
        ng = math.ceil(i / fmt.group_size)
        tiled = fmt.bits <= 4 and o % TILE_ROWS == 0 and i % QBLOCK == 0
        if tiled:  # 16-row tiles: 4-bit nibbles, or 2/3-bit bit planes (bits/8 bytes per weight)
            return n * fmt.bits // 8 + 13 * o * ng + bias
        if fmt.bits >= 5 and i % QBLOCK == 0:
            return n + 9 * o * ng + bias
        return o * math.ceil(i * fmt.bits / 8) + 5 * o * ng + bias  # portable packed codes, scale + zero
    if fmt.kind == "nf4":
        nb = math.ceil(n / 64)
        return n // 2 + nb + 4 * math.ceil(nb / 256) + 4 + bias
    if fmt.kind == "gguf":
        return gguf_linear_bytes(fmt.gguf_type, o, i) + bias
    raise SlimlmError(f"format {fmt.name!r} has no per-linear size")


def gguf_linear_bytes(qtype: str, out_features: int, in_features: int) -> int:
    """``GGUFLinear`` storage of a GGUF type (the native layouts of ``slimlm.quant.linear.gguf_blocks``)."""
    layouts = gguf_layouts()
    if qtype not in layouts:
        raise SlimlmError(f"GGUF type {qtype} has no native slimlm layout (native: {', '.join(layouts)})")
    _, _, group, nib, c0, has_zs = layouts[qtype]
    n = out_features * in_features
    terms = out_features * math.ceil(in_features / group)
    extra = 4 if c0 and group % QBLOCK == 0 else 0  # Q4_0: the decode kernel's zero*scale term
    return (n // 2 if nib else n) + terms * (4 + (4 if has_zs else 0) + extra)


def gguf_file_bytes(qtype: str, numel: int) -> int:
    """Bytes a tensor of ``numel`` values takes in a GGUF file of type ``qtype`` (gguf's block sizes)."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[qtype]]
    return numel // block * size


def weight_bytes(shape: ModelShape, fmt: WeightFormat, float_dtype: str = "fp32") -> dict[str, Any]:
    """Resident weight bytes of ``shape`` in ``fmt``: ``{"total", "linears", "lm_head", "other", ...}``.

    ``float_dtype``: the dtype of what stays float (embeddings, norms, lm_head); ``bf16`` as format
    makes everything bf16.
    """
    fb = FLOAT_BYTES["bf16" if fmt.name == "bf16" else float_dtype]
    if fmt.kind == "native":
        return _native_bytes(shape, fb)
    head = [lin for lin in shape.linears if lin.path == "lm_head"]
    dec = shape.decoder_linears()
    lin_fmt = fmt if fmt.kind != "float" else WeightFormat("bf16" if fb == 2 else "fp32", "float")
    head_fmt = WeightFormat("bf16" if fb == 2 else "fp32", "float")
    lin_b = sum(linear_bytes(lin, lin_fmt, fb) for lin in dec)
    head_b = sum(linear_bytes(lin, head_fmt, fb) for lin in head)
    other_b = sum(shape.other_params.values()) * fb
    return _totals(lin_b, head_b, other_b, shape, fb)


def _totals(lin_b: int, head_b: int, other_b: int, shape: ModelShape, fb: int) -> dict[str, Any]:
    emb = shape.other_params.get("model.embed_tokens.weight", 0)
    # bytes one decode step reads: every linear and the head (the tied head reads the embedding table)
    head_read = head_b if head_b else (emb * fb if shape.tied else 0)
    return {"total": lin_b + head_b + other_b, "linears": lin_b, "lm_head": head_b, "other": other_b,
            "decode_read": lin_b + head_read, "float_bytes": fb}


def _native_bytes(shape: ModelShape, fb: int) -> dict[str, Any]:
    """The checkpoint's own layout: GGUF types as stored, a slimlm output's kinds, else float."""
    lin_b = head_b = 0
    other_b = 0
    for lin in shape.linears:
        b = _native_linear(shape, lin, fb)
        if lin.path == "lm_head":
            head_b += b
        else:
            lin_b += b
    emb_read = 0
    for name, numel in shape.other_params.items():
        qt = shape.gguf_types.get(name[: -len(".weight")]) if name.endswith(".weight") else None
        if qt in gguf_layouts() and name == "model.embed_tokens.weight":
            cols = shape.config.hidden_size
            other_b += gguf_linear_bytes(qt, numel // cols, cols)
            emb_read = gguf_linear_bytes(qt, numel // cols, cols)
        else:
            other_b += numel * fb
            if name == "model.embed_tokens.weight":
                emb_read = numel * fb
    out = _totals(lin_b, head_b, other_b, shape, fb)
    if shape.tied and not head_b:
        out["decode_read"] = lin_b + emb_read
    return out


def _native_linear(shape: ModelShape, lin: LinearShape, fb: int) -> int:
    qt = shape.gguf_types.get(lin.path)
    if qt in gguf_layouts():
        return gguf_linear_bytes(qt, lin.out_features, lin.in_features) + (4 * lin.out_features if lin.bias else 0)
    entry = shape.modules.get(lin.path)
    if entry is None:
        return linear_bytes(lin, WeightFormat("bf16" if fb == 2 else "fp32", "float"), fb)
    return linear_bytes(lin, format_of_module(entry), fb)


def format_of_module(entry: dict[str, Any]) -> WeightFormat:
    """The format of a slimlm.json module entry (kinds without a formula here count as fp32)."""
    kind, spec = entry.get("kind"), entry.get("spec", {})
    if kind == "int8_weight" and int(spec.get("group_size", -1)) in (-1, 0) and spec.get("symmetric", True):
        return WeightFormat("int8", "int8", 8, -1)
    if kind in ("int4_weight", "intx_weight", "int8_weight"):
        bits, g = int(spec.get("bits", 4 if kind == "int4_weight" else 8)), int(spec.get("group_size", 128))
        return WeightFormat(f"int{bits}", "intx", bits=bits, group_size=g if g > 0 else 1 << 30)
    if kind == "nf4":
        return WeightFormat("nf4", "nf4", 4, 64)
    if kind == "gguf":
        return WeightFormat(str(spec.get("gguf_type")), "gguf", gguf_type=str(spec.get("gguf_type")))
    return WeightFormat("fp32", "float", 32)
