"""Standard export formats for quantized models (layouts in docs/quant-formats.md).

- :func:`export_compressed_tensors`: compressed-tensors ``pack-quantized`` (vLLM, transformers);
- :func:`export_gptq`: GPTQ ``qweight/qzeros/scales/g_idx`` + ``quantize_config.json`` (v1 or v2 zeros);
- :func:`gguf_blocks` / :func:`export_gguf_quantized`: GGUF Q8_0 / Q4_0 / Q4_1 blocks (llama.cpp).

Each takes :class:`ExportParts` (``{HF module path: QuantizedWeight}`` + biases + unquantized tensors +
the HF config), built from a loaded model by :func:`split_model`, and writes atomically.
Tests: ``.venv/bin/pytest tests/quant/test_export.py``.
"""

from slimlm.quant.export.common import ExportParts, split_model
from slimlm.quant.export.compressed_tensors import (
    ct_quantization_config,
    ct_tensors,
    export_compressed_tensors,
)
from slimlm.quant.export.gguf_blocks import (
    export_gguf_quantized,
    gguf_blocks,
    gguf_raw_from_model,
    pack_exact,
)
from slimlm.quant.export.gptq import export_gptq, gptq_quantize_config, gptq_tensors

__all__ = [
    "ExportParts",
    "ct_quantization_config",
    "ct_tensors",
    "export_compressed_tensors",
    "export_gguf_quantized",
    "export_gptq",
    "gguf_blocks",
    "gguf_raw_from_model",
    "gptq_quantize_config",
    "gptq_tensors",
    "pack_exact",
    "split_model",
]
