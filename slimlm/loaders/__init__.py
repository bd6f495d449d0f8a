"""Load any supported checkpoint into the slimlm runtime, and save/export it.

Example::

    from slimlm.loaders import load_model
    lm = load_model("smollm2-135m", dtype=torch.bfloat16)   # alias, .gguf, HF folder, slimlm dir, hub id
    print(lm.config.architecture, lm.model.num_parameters())
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from slimlm.loaders.resolve import DEFAULT_MODEL, resolve
from slimlm.loaders.schema import SLIMLM_FORMAT_VERSION, module_error
from slimlm.loaders.types import Checkpoint
from slimlm.models.config import ModelConfig
from slimlm.models.families import hf_to_runtime
from slimlm.models.modules import SwappableLinear, build_linear
from slimlm.models.transformer import Transformer
from slimlm.utils.errors import CheckpointError
from slimlm.utils.memory import current_rss_bytes, module_nbytes, release_free_memory, tensor_storage_nbytes

__all__ = ["DEFAULT_MODEL", "SLIMLM_FORMAT_VERSION", "LoadedModel", "build_model", "load_model", "read_checkpoint",
           "resolve"]


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Any  # slimlm.loaders.tokenizer.Tokenizer | None
    config: ModelConfig
    checkpoint: Checkpoint
    meta: dict[str, Any] = field(default_factory=dict)  # slimlm.json contents for slimlm dirs
    other_bytes: int = 0  # resident memory the load added besides tensors (tokenizer, metadata, imports)


def read_checkpoint(spec: str) -> Checkpoint:
    path, kind = resolve(spec)
    if kind == "gguf":
        from slimlm.loaders.gguf_reader import read_gguf

        ckpt = read_gguf(path)
    elif kind == "slimlm":
        from slimlm.loaders.save import read_slimlm_dir

        ckpt = read_slimlm_dir(path)
    else:
        from slimlm.loaders.hf import read_hf_folder

        ckpt = read_hf_folder(path)
    return ckpt


def import_plugins() -> None:
    """Import the packages that register swappable linear kinds (quant, sparsity, lowrank)."""
    import importlib

    for mod in ("slimlm.quant.linear", "slimlm.sparsity", "slimlm.lowrank"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):
                raise


def build_model(config: ModelConfig, runtime_tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                modules: dict[str, dict[str, Any]] | None = None, where: str = "slimlm.json",
                prebuilt: dict[str, nn.Module] | None = None) -> Transformer:
    """Create (on the meta device) -> swap in recorded module kinds -> load -> process after loading.

    ``modules``: the checked ``slimlm.json`` "modules" (:mod:`slimlm.loaders.schema`); ``where``
    names that file in errors. ``prebuilt``: modules already holding their tensors (GGUF native
    layers), set at their paths as is.
    """
    with torch.device("meta"):
        model = Transformer(config)
    for path, mod in (prebuilt or {}).items():
        model.set_submodule(path, mod)
    if modules:
        import_plugins()
        for path, entry in modules.items():
            try:
                old = model.get_submodule(path)
            except AttributeError:
                raise CheckpointError(f"{where}: modules[{path!r}] names no module of this "
                                      f"{config.architecture} model") from None
            if not isinstance(old, nn.Linear):
                raise CheckpointError(f"{where}: modules[{path!r}] names a {type(old).__name__}, not a linear layer")
            try:
                with torch.device("cpu"):
                    new = build_linear(entry["kind"], old.in_features, old.out_features, old.bias is not None,
                                       entry["spec"])
            except (KeyError, TypeError, ValueError, AttributeError, CheckpointError) as e:
                raise module_error(where, path, entry["kind"], e) from None
            model.set_submodule(path, new)
    sd = {}
    for k, t in runtime_tensors.items():
        sd[k] = t.to(dtype) if t.is_floating_point() and not _keeps_dtype(k, modules) else t
    expected = {k for k in model.state_dict() if not any(k.startswith(p + ".") for p in prebuilt or {})}
    tied = model.ties_lm_head()
    if tied:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(sd))
    unexpected = sorted(set(sd) - expected)
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor {missing[0]!r} ({len(missing)} missing)")
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected)")
    try:
        model.load_state_dict(sd, strict=False, assign=True)
    except RuntimeError as e:
        msg = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln]
        raise CheckpointError(f"checkpoint does not match its config: {msg[0] if msg else str(e).splitlines()[0]}") from None
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    _materialize_meta(model, dtype)
    for m in model.modules():
        if isinstance(m, SwappableLinear):
            m.process_after_loading()
    model.eval()
    model.requires_grad_(False)
    model.fuse_projections_()
    return model


def _keeps_dtype(name: str, modules: dict[str, dict[str, Any]] | None) -> bool:
    """Tensors of swapped modules (scales, packed codes) keep their stored dtype."""
    return bool(modules) and any(name.startswith(p + ".") for p in modules or {})


def _materialize_meta(model: nn.Module, dtype: torch.dtype) -> None:
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            raise CheckpointError(f"buffer {name!r} was not loaded")
    for name, p in model.named_parameters():
        if p.is_meta:
            raise CheckpointError(f"parameter {name!r} was not loaded")


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32,
               dequantize: bool | None = None) -> LoadedModel:
    """Load MODEL (alias, .gguf, HF folder, slimlm output dir, hub id) into the runtime.

    GGUF files keep their quantized types (``slimlm.loaders.gguf_native``) unless ``dequantize`` is
    True (every tensor de-quantized to float, e.g. to compress the model again); ``dequantize=False``
    makes a tensor that cannot stay quantized an error instead of a de-quantized fallback.
    """
    path, kind = resolve(spec)
    if kind == "gguf" and dequantize is not True:
        from slimlm.loaders.gguf_native import load_gguf_native

        release_free_memory()
        rss0 = current_rss_bytes()
        lm = load_gguf_native(path, dtype, strict=dequantize is False)
        release_free_memory()
        # the codes are read straight into the model: what else the load left resident (tokenizer,
        # metadata, libraries first imported) is the RSS growth beyond the model's tensors
        lm.other_bytes = max(0, current_rss_bytes() - rss0 - module_nbytes(lm.model))
        return lm
    release_free_memory()
    rss0 = current_rss_bytes()
    ckpt = read_checkpoint(str(path))
    release_free_memory()
    # what reading added besides the tensors: the tokenizer, metadata, libraries first imported
    other = max(0, current_rss_bytes() - rss0 - tensor_storage_nbytes(ckpt.tensors.values()))
    config = ModelConfig.from_hf(ckpt.config)
    meta = ckpt.meta.get("slimlm", {}) if ckpt.format == "slimlm" else {}
    runtime = ckpt.tensors if ckpt.format == "slimlm" else hf_to_runtime(config, ckpt.tensors)
    model = build_model(config, runtime, dtype, meta.get("modules"), where=f"{ckpt.source}/slimlm.json")
    # the model holds what it needs (converted, fused, re-laid); the interchange tensors would keep a
    # second copy of every weight alive (e.g. GGUF's float32 de-quantization under a bf16 model)
    del runtime
    ckpt.tensors = {}
    release_free_memory()
    tok = ckpt.tokenizer
    return LoadedModel(model=model, tokenizer=tok, config=config, checkpoint=ckpt, meta=meta, other_bytes=other)


def describe(lm: LoadedModel) -> dict[str, Any]:
    """What ``slimlm info`` prints: architecture, parameters, dtype, sizes on disk and in memory.

    ``tensor_bytes`` counts every tensor storage the model holds (weights in their runtime layout,
    decode-kernel copies, fused projections; each once); ``size_in_memory_bytes`` adds what reading the
    checkpoint left resident besides tensors (tokenizer, metadata; measured by the loader as RSS growth
    minus the tensors read); ``process_rss_bytes`` is the resident
    memory of the whole process (Python, torch and the tokenizer included), measured after a heap trim.
    """
    cfg = lm.config
    model = lm.model
    release_free_memory()  # so the process RSS below counts live data, not freed heap pages
    mem = module_nbytes(model)  # every tensor storage the model holds, runtime copies included
    kinds: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, SwappableLinear):
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
    return {
        "source": lm.checkpoint.source,
        "format": lm.checkpoint.format,
        "architecture": cfg.architecture,
        "family": cfg.family,
        "parameters": model.num_parameters(),
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "attention_heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "tied_embeddings": cfg.tie_word_embeddings,
        "dtype": str(model.dtype).replace("torch.", ""),
        "size_on_disk_bytes": lm.checkpoint.file_bytes,
        "size_in_memory_bytes": mem + lm.other_bytes,
        "tensor_bytes": mem,
        "process_rss_bytes": current_rss_bytes(),
        "compressed_modules": kinds,
        "gguf_tensor_types": _count(lm.checkpoint.meta.get("gguf_tensor_types", {})),
        "chat_template": bool(lm.tokenizer is not None and getattr(lm.tokenizer, "chat_template", None)),
    }


def _count(types: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in types.values():
        out[str(v)] = out.get(str(v), 0) + 1
    return out


def dump_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)


def default_output_meta(lm: LoadedModel) -> dict[str, Any]:
    return {"source": lm.checkpoint.source, "source_format": lm.checkpoint.format}
