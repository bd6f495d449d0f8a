"""Load a GGUF file into the runtime with its quantized tensors kept as they are (no float round trip).

Why: ``read_gguf`` de-quantizes every tensor to float32 (4-6x the file in memory). Here the linear and
embedding weights of the types slimlm runs natively (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K) become
:class:`~slimlm.quant.linear.gguf.GGUFLinear` modules built straight from their blocks; the token
embeddings become a :class:`~slimlm.quant.linear.gguf.GGUFEmbedding` (rows de-quantized on lookup) that
shares its table with a tied ``lm_head``. Float tensors (norms, biases, F16/F32 weights) and quantized
types without a native layout (one notice per type; an error when ``strict``) load as before.
Architectures: llama (SmolLM, Mistral), qwen2, gemma3; other GGUF architectures are de-quantized.

Example::

    lm = load_model("smollm2-135m")                   # native (this module)
    lm = load_model("smollm2-135m", dequantize=True)  # every tensor float32, as read_gguf gives them

Tests: ``.venv/bin/pytest tests/loaders/test_gguf_native.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from slimlm.models.config import ModelConfig
from slimlm.models.families import hf_to_runtime

if TYPE_CHECKING:
    from slimlm.loaders import LoadedModel


def _runtime_path(cfg: ModelConfig, hf_module: str) -> str:
    """HF module name -> runtime module path (``model.layers.0.input_layernorm`` -> ``...attn_norm``)."""
    (name,) = hf_to_runtime(cfg, {hf_module + ".weight": torch.empty(0)})
    return name[: -len(".weight")]


def load_gguf_native(path: Path, dtype: torch.dtype, strict: bool = False) -> LoadedModel:
    """Read ``path`` natively and build the runtime model (see the module docstring)."""
    from slimlm.loaders import LoadedModel, build_model
    from slimlm.loaders.gguf_reader import read_gguf
    from slimlm.quant.linear.gguf import GGUFEmbedding, GGUFLinear

    ckpt = read_gguf(path, native=True, strict=strict)
    config = ModelConfig.from_hf(ckpt.config)
    raw = ckpt.meta.pop("gguf_native")
    prebuilt: dict[str, nn.Module] = {}
    embed_table: GGUFLinear | None = None
    while raw:
        hf_name, (qtype, blocks, cols) = raw.popitem()  # drop each block view once used
        module = hf_name[: -len(".weight")]
        bias = ckpt.tensors.pop(module + ".bias", None)
        lin = GGUFLinear.from_blocks(blocks, qtype, cols, bias)
        del blocks
        path_rt = _runtime_path(config, module)
        if path_rt == "model.embed_tokens":
            embed_table = lin
        else:
            prebuilt[path_rt] = lin
    if embed_table is not None:
        prebuilt["model.embed_tokens"] = GGUFEmbedding(embed_table, dtype)
        if config.tie_word_embeddings:
            prebuilt["lm_head"] = embed_table  # one copy serves the lookup and the head
    runtime = hf_to_runtime(config, ckpt.tensors)
    model = build_model(config, runtime, dtype, prebuilt=prebuilt)
    ckpt.tensors = {}  # the runtime model holds every tensor now
    return LoadedModel(model=model, tokenizer=ckpt.tokenizer, config=config, checkpoint=ckpt, meta={})
