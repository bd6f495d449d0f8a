"""Quantized runtime linears with real packed storage (importing this package registers every kind).

Kinds (``SwappableLinear.kind``) and what they hold (details in each module and docs/quant-formats.md):

- ``int8_weight``  :class:`Int8WeightLinear`  int8 weights, ``aten._weight_int8pack_mm`` (bf16 activations)
- ``int4_weight``  :class:`Int4WeightLinear`  4-bit two per byte, ``aten._weight_int4pack_mm_for_cpu``
- ``intx_weight``  :class:`IntxWeightLinear`  2..8-bit packed codes, dequantize + matmul
- ``nf4``          :class:`NF4Linear`         QLoRA NF4 codes, block absmax (+ double quantization)
- ``w8a8``         :class:`W8A8Linear`        SmoothQuant int8 weights x per-token int8 activations
- ``int8_outlier`` :class:`Int8OutlierLinear` LLM.int8(): int8 + float outlier columns
- ``gguf``         :class:`GGUFLinear`        a GGUF quantized type as stored (Q8_0..Q5_1, K-quants)

Every module: ``from_quantized(...)`` builds it from a method's result, ``create(in, out, bias, spec)``
builds it empty for loading, then ``load_state_dict`` and ``process_after_loading()``;
``dense_weight()`` is the exact reference dequantization. Tests: ``.venv/bin/pytest tests/quant/test_linear.py``.
"""

from slimlm.quant.linear.base import QuantLinearBase, persistent_nbytes, runtime_nbytes
from slimlm.quant.linear.gguf import GGUFEmbedding, GGUFLinear
from slimlm.quant.linear.int8 import Int8WeightLinear
from slimlm.quant.linear.intx import Int4WeightLinear, IntxWeightLinear
from slimlm.quant.linear.nf4 import NF4Linear
from slimlm.quant.linear.w8a8 import Int8OutlierLinear, W8A8Linear

__all__ = [
    "GGUFEmbedding",
    "GGUFLinear",
    "Int4WeightLinear",
    "Int8OutlierLinear",
    "Int8WeightLinear",
    "IntxWeightLinear",
    "NF4Linear",
    "QuantLinearBase",
    "W8A8Linear",
    "persistent_nbytes",
    "runtime_nbytes",
]
