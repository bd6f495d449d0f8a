"""Write a model (HF config + HF-named tensors + tokenizer) as a GGUF file that llama.cpp and transformers read.

Why: exporting a compressed model to GGUF lets it run in llama.cpp/ollama. This is the inverse of
`slimlm.loaders.gguf_reader`: HF names -> GGUF names, llama's Q/K rows re-permuted into llama.cpp's
rotary layout, Gemma norms stored as (1 + w), GPT-2 Conv1D weights transposed, metadata (sizes, rope,
eps, tokenizer vocabulary/merges/special ids, chat template) written under llama.cpp's keys, tensors
encoded with ``gguf.quants.quantize`` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1), slimlm's K-quant
encoders (Q4_K, Q5_K, Q6_K: :mod:`slimlm.loaders.gguf_kquants`) or llama.cpp's Q4_K_M / Q5_K_M mixes
(:mod:`slimlm.loaders.gguf_mix` picks each tensor's type), or taken pre-packed from ``raw`` (e.g. a
symmetric group-32 GPTQ result is exactly Q4_0). The file is written to a temp path in the
same folder and renamed, so a crash never leaves a half-written GGUF; it carries the metadata key
``slimlm.written_by``, and an existing file is replaced only when it has that key
(:mod:`slimlm.loaders.outputs`).

Example:
    write_gguf("out.gguf", ckpt.config, ckpt.tensors, ckpt.tokenizer, default_type="Q4_K_M")

Tests: ``.venv/bin/pytest tests/loaders/test_gguf.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimlm.loaders.gguf_kquants import KQUANT_TYPES, quantize_kquant
from slimlm.loaders.gguf_mix import FILE_TYPE, check_write_type, tensor_type
from slimlm.loaders.gguf_reader import (
    CONFIG_KEYS,
    GPT2_CONV1D,
    LLAMA3_SPLIT,
    QWEN2_SPLIT,
    SUPPORTED_ARCHS,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    hf_to_gguf_name,
    llama_permute_rows,
)
from slimlm.loaders.outputs import atomic_file, check_output_file
from slimlm.loaders.tokenizer import Tokenizer
from slimlm.utils.errors import CheckpointError, SlimlmError

# HF model_type -> GGUF architecture
MODEL_TYPE_TO_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gemma3_text": "gemma3",
                      "gemma3": "gemma3", "gpt2": "gpt2"}
WRITTEN_BY_KEY = "slimlm.written_by"  # metadata key marking a GGUF file slimlm wrote (llama.cpp ignores it)
RawTensor = tuple[np.ndarray, Any, tuple[int, ...]]  # (packed uint8 blocks, GGMLQuantizationType, HF shape)


def written_by_slimlm(path: Path) -> bool:
    """True for a GGUF file slimlm wrote (it carries ``slimlm.written_by``): the only file --overwrite replaces."""
    from slimlm.loaders.gguf_reader import GGUFFile
    from slimlm.loaders.resolve import is_gguf_file

    try:
        return is_gguf_file(path) and GGUFFile(path).metadata.get(WRITTEN_BY_KEY) == "slimlm"
    except (OSError, SlimlmError):
        return False


def gguf_arch_for(config: dict[str, Any]) -> str:
    model_type = str(config.get("model_type", ""))
    arch = MODEL_TYPE_TO_ARCH.get(model_type)
    if arch is None:
        raise CheckpointError(f"cannot write model_type {model_type!r} as GGUF "
                              f"(supported: {', '.join(sorted(MODEL_TYPE_TO_ARCH))})")
    return arch


def _rope_params(config: dict[str, Any]) -> dict[str, Any]:
    """The global-attention rope parameters, from transformers 4.x (flat) or 5.x (rope_parameters) configs."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]  # per-layer-type rope (Gemma 3): llama.cpp's freq_base is the global one
    out = dict(params) if isinstance(params, dict) else {}
    if config.get("rope_theta") is not None:
        out["rope_theta"] = config["rope_theta"]
    if isinstance(config.get("rope_scaling"), dict):
        out.update(config["rope_scaling"])
    return out


def _rope_theta(config: dict[str, Any]) -> float | None:
    theta = _rope_params(config).get("rope_theta")
    return float(theta) if theta is not None else None


def _head_dim(config: dict[str, Any]) -> int:
    if config.get("head_dim"):
        return int(config["head_dim"])
    return int(config["hidden_size"]) // int(config["num_attention_heads"])


def add_config_metadata(w: Any, arch: str, config: dict[str, Any]) -> None:
    """Write ``<arch>.*`` hyper-parameters (inverse of the reader's CONFIG_KEYS)."""
    cfg = dict(config)
    if arch != "gpt2":
        if (theta := _rope_theta(cfg)) is not None:
            cfg["rope_theta"] = theta
        cfg["head_dim"] = _head_dim(cfg)
        cfg.setdefault("num_key_value_heads", cfg.get("num_attention_heads"))
    else:
        cfg["n_inner"] = cfg.get("n_inner") or 4 * int(cfg["n_embd"])
        cfg.setdefault("n_ctx", cfg.get("n_positions"))
    for gguf_key, hf_key in CONFIG_KEYS[arch].items():
        value = cfg.get(hf_key)
        if value is None or isinstance(value, bool):
            continue
        key = f"{arch}.{gguf_key}"
        if isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
    if arch in ("llama", "qwen2") and cfg["head_dim"] != int(cfg["hidden_size"]) // int(cfg["num_attention_heads"]):
        w.add_uint32(f"{arch}.attention.key_length", cfg["head_dim"])
        w.add_uint32(f"{arch}.attention.value_length", cfg["head_dim"])
    if arch == "qwen2":
        w.add_uint32(f"{arch}.rope.dimension_count", cfg["head_dim"])
    if arch == "gemma3":
        w.add_uint32(f"{arch}.attention.value_length", cfg["head_dim"])
    scaling = _rope_params(config)
    if scaling.get("rope_type", scaling.get("type")) in ("linear", "yarn") and scaling.get("factor"):
        w.add_string(f"{arch}.rope.scaling.type", str(scaling.get("rope_type", scaling.get("type"))))
        w.add_float32(f"{arch}.rope.scaling.factor", float(scaling["factor"]))
        if scaling.get("original_max_position_embeddings"):
            w.add_uint32(f"{arch}.rope.scaling.original_context_length",
                         int(scaling["original_max_position_embeddings"]))


def _merges(backend_json: dict[str, Any]) -> list[str]:
    merges = backend_json.get("model", {}).get("merges") or []
    return [m if isinstance(m, str) else " ".join(m) for m in merges]


def _gguf_pre(tokenizer: Tokenizer, backend_json: dict[str, Any]) -> str:
    if tokenizer.gguf_pre:
        return tokenizer.gguf_pre
    text = json.dumps(backend_json.get("pre_tokenizer"))
    for name, regex in (("llama-bpe", LLAMA3_SPLIT), ("qwen2", QWEN2_SPLIT)):
        if json.dumps(regex)[1:-1] in text:
            return name
    return "gpt-2"  # llama.cpp's name for GPT-2's split regex ("gpt2" is refused as unknown)


def add_tokenizer_metadata(w: Any, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, token types, special ids and chat template."""
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise CheckpointError(f"writing a {model.get('type')} tokenizer to GGUF is not supported "
                              "(only byte-level BPE tokenizers)")
    added = tokenizer.backend.get_added_tokens_decoder()
    n = max(vocab_size, tokenizer.vocab_size)
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n):
        tok = tokenizer.backend.id_to_token(i)
        if tok is None:  # embedding rows past the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        elif i in added:
            tokens.append(tok)
            types.append(TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
        else:
            tokens.append(tok)
            types.append(TOKEN_NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_gguf_pre(tokenizer, data))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(data))
    for tid, adder in ((tokenizer.bos_token_id, w.add_bos_token_id), (tokenizer.eos_token_id, w.add_eos_token_id),
                       (tokenizer.token_to_id(tokenizer.special_tokens.get("unk_token")), w.add_unk_token_id),
                       (tokenizer.pad_token_id, w.add_pad_token_id)):
        if tid is not None:
            adder(int(tid))
    w.add_add_bos_token(tokenizer.add_bos_token)
    w.add_bool("tokenizer.ggml.add_eos_token", False)
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)


def _to_gguf_layout(arch: str, config: dict[str, Any], gguf_name: str, w: np.ndarray) -> np.ndarray:
    """HF tensor (float32 numpy or packed rows) -> the layout llama.cpp stores."""
    base = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
    if arch == "llama" and base in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if base == "attn_q" else config.get(
            "num_key_value_heads") or config["num_attention_heads"]
        return llama_permute_rows(w, int(heads), inverse=False)
    if arch == "gemma3" and gguf_name.endswith("norm.weight"):
        return w + np.float32(1.0)
    if arch == "gpt2" and base in GPT2_CONV1D and gguf_name.endswith(".weight"):
        return np.ascontiguousarray(w.T)
    return w


def _choose_type(hf_name: str, gguf_name: str, shape: tuple[int, ...], requested: str, keep_f32: tuple[str, ...],
                 n_layers: int, tied: bool) -> str:
    if len(shape) < 2 or any(k in hf_name for k in keep_f32):
        return "F32"
    return tensor_type(gguf_name, shape, requested, n_layers, tied)


def encode_tensor(data: np.ndarray, kind: str) -> tuple[np.ndarray, Any]:
    """float32 ``[rows, cols]`` in GGUF layout -> (array to write, raw GGML type or None for float arrays)."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if kind == "F32":
        return data, None
    if kind == "F16":
        return data.astype(np.float16), None
    if kind in KQUANT_TYPES:
        return quantize_kquant(data, kind), Q[kind]
    return gguf.quants.quantize(data, Q[kind]), Q[kind]


def write_gguf(path: str | os.PathLike[str], config: dict[str, Any], tensors: dict[str, torch.Tensor],
               tokenizer: Tokenizer | None, default_type: str = "F16",
               keep_f32: Iterable[str] = ("norm", "bias"),
               raw: dict[str, RawTensor] | None = None, name: str | None = None,
               embed_type: str | None = None) -> dict[str, str]:
    """Write a GGUF file.

    Args:
        path: output ``.gguf`` (written to a temp file in the same folder, then renamed).
        config: HF config.json dict (``model_type`` picks the GGUF architecture: llama/mistral, qwen2,
            gemma3_text, gpt2).
        tensors: float tensors under HF names (``lm_head.weight`` is skipped when embeddings are tied).
        tokenizer: written as ``tokenizer.ggml.*`` metadata (byte-level BPE), or None for no tokenizer.
        default_type: GGUF type of 2-D weights: one of ``gguf_mix.WRITE_TYPES`` ("F32", "F16", "BF16", "Q8_0",
            "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K") or a mix ("Q4_K_M", "Q5_K_M": per-tensor
            types as llama-quantize picks them). Rows that do not fit a type's blocks fall back as llama.cpp does.
        keep_f32: HF-name substrings always stored as F32 (1-D tensors always are).
        raw: pre-packed tensors ``{hf_name: (uint8 blocks [rows, bytes_per_row], GGMLQuantizationType,
            HF shape)}``, written as given (rows re-permuted for llama Q/K); they replace ``tensors[hf_name]``.
        name: ``general.name``.
        embed_type: GGUF type of the token embedding and output head (default: ``default_type``);
            e.g. "Q8_0" with ``default_type="Q4_0"``, since 4-bit embeddings cost much more quality.

    Returns:
        ``{hf_name: GGUF type name}`` of every tensor written.
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    for wanted in (default_type, embed_type or default_type):
        check_write_type(wanted)
    arch = gguf_arch_for(config)
    assert arch in SUPPORTED_ARCHS
    raw = raw or {}
    keep = tuple(keep_f32)
    tied = bool(config.get("tie_word_embeddings", arch != "gpt2" and "lm_head.weight" not in tensors))
    n_layers = int(config.get("num_hidden_layers") or config.get("n_layer") or 0)
    written: dict[str, str] = {}

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, arch)
        w.add_name(name or str(config.get("_name_or_path") or "slimlm model"))
        w.add_string(WRITTEN_BY_KEY, "slimlm")  # what lets --overwrite replace this file later
        w.add_file_type(FILE_TYPE[default_type])
        if default_type not in ("F32", "F16", "BF16") or raw:
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_config_metadata(w, arch, config)
        if tokenizer is not None:
            vocab = int(config.get("vocab_size") or tokenizer.vocab_size)
            add_tokenizer_metadata(w, tokenizer, vocab)
        for hf_name in list(tensors) + [n for n in raw if n not in tensors]:
            if hf_name == "lm_head.weight" and tied:
                continue
            gname = hf_to_gguf_name(arch, hf_name)
            if gname is None:
                raise CheckpointError(f"tensor {hf_name!r} has no GGUF name for architecture {arch!r}")
            if hf_name in raw:
                blocks, qtype, shape = raw[hf_name]
                qtype = Q(qtype)
                if arch == "gpt2" and gname.split(".")[2] in GPT2_CONV1D:
                    raise CheckpointError(f"pre-packed GPT-2 Conv1D tensor {hf_name!r} cannot be transposed")
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                rows, cols = int(np.prod(shape[:-1])), int(shape[-1])
                if cols % block or blocks.dtype != np.uint8 or blocks.size != rows * cols // block * type_size:
                    raise CheckpointError(f"raw tensor {hf_name!r}: {blocks.size} bytes do not hold a {qtype.name} "
                                          f"tensor of shape {tuple(shape)}")
                packed = _to_gguf_layout(arch, config, gname, blocks.reshape(rows, -1))
                w.add_tensor(gname, np.ascontiguousarray(packed), raw_dtype=qtype)  # shape from the bytes
                written[hf_name] = qtype.name
                continue
            t = tensors[hf_name].detach().to(torch.float32).cpu().numpy()  # [out, in] (HF)
            data = np.ascontiguousarray(_to_gguf_layout(arch, config, gname, t), dtype=np.float32)
            is_embed = gname.split(".")[0] in ("token_embd", "output")
            requested = embed_type if (is_embed and embed_type) else default_type
            kind = _choose_type(hf_name, gname, tuple(data.shape), requested, keep, n_layers, tied)
            arr, qt = encode_tensor(data, kind)
            if qt is None:
                w.add_tensor(gname, arr)
            else:
                w.add_tensor(gname, arr, raw_dtype=qt)
            written[hf_name] = kind
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    atomic_file(path, write, owned=written_by_slimlm)
    return written


def export_gguf(lm: Any, out: str | os.PathLike[str], default_type: str = "Q8_0", overwrite: bool = False,
                raw: dict[str, RawTensor] | None = None, embed_type: str | None = None) -> dict[str, str]:
    """Export a loaded runtime model (`slimlm.loaders.LoadedModel`) as a GGUF file.

    Compressed (swappable) linears are expanded with ``dense_weight()`` and re-encoded as
    ``default_type``, unless ``raw`` gives their packed blocks. Returns ``{hf_name: GGUF type}``.
    """
    from slimlm.loaders.save import dense_runtime_tensors, head_tying
    from slimlm.models.families import runtime_to_hf

    out = check_output_file(out, overwrite, written_by_slimlm)
    model = lm.model
    runtime = dense_runtime_tensors(model, torch.float32)
    config = model.config.to_hf_config()
    tied = head_tying(model, config)  # a quantized head of a tied model is written as its own `output`
    return write_gguf(out, config, runtime_to_hf(model.config, runtime, tied), lm.tokenizer,
                      default_type=default_type, raw=raw, embed_type=embed_type)
