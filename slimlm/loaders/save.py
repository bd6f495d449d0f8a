"""Write models: slimlm output directories (any compressed model) and plain HF folders.

A slimlm output directory holds ``config.json`` (the HF config of the architecture, structural
edits applied), ``model.safetensors`` under runtime names, the tokenizer files, and ``slimlm.json``:
``{"format_version": 1, "tensor_names": "runtime", "modules": {path: {"kind", "spec"}}, ...}``.
Everything is written into a temporary sibling folder and renamed at the end, so an interrupted
save never leaves a half-written model; what may be replaced is decided in
:mod:`slimlm.loaders.outputs` (only folders slimlm wrote, never anyone else's files).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slimlm.loaders.hf import read_config, read_safetensors
from slimlm.loaders.outputs import atomic_dir, check_output_dir
from slimlm.loaders.schema import SLIMLM_FORMAT_VERSION, validate_slimlm_json
from slimlm.loaders.types import Checkpoint
from slimlm.models.families import runtime_to_hf
from slimlm.models.modules import SwappableLinear
from slimlm.models.transformer import Transformer
from slimlm.utils.errors import CheckpointError


def _owned(t: torch.Tensor) -> torch.Tensor:
    """A tensor that owns its storage (fused q/k/v weights are views; safetensors refuses shared memory)."""
    t = t.detach().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    sd = {k: _owned(v) for k, v in model.state_dict().items()}
    if model.ties_lm_head():
        sd.pop("lm_head.weight", None)
    return sd


def module_entries(model: Transformer) -> dict[str, dict[str, Any]]:
    return {name: {"kind": m.kind, "spec": m.spec()} for name, m in model.named_modules()
            if isinstance(m, SwappableLinear)}


def save_model(lm: Any, out: str | Path, meta: dict[str, Any] | None = None, overwrite: bool = False) -> Path:
    """Save a (possibly compressed) LoadedModel as a slimlm output directory that every command loads."""
    out = check_output_dir(out, overwrite)
    model: Transformer = lm.model
    info = {
        "format_version": SLIMLM_FORMAT_VERSION,
        "tensor_names": "runtime",
        "modules": module_entries(model),
        "dtype": str(model.dtype).replace("torch.", ""),
        "source": getattr(lm.checkpoint, "source", ""),
        **(meta or {}),
    }

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(model.config.to_hf_config(), indent=2))
        save_file(_state_dict(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "slimlm.json").write_text(json.dumps(info, indent=2, default=str))
        if lm.tokenizer is not None:
            lm.tokenizer.save(tmp)

    return atomic_dir(out, write, kind="slimlm-model")


def read_slimlm_dir(folder: Path) -> Checkpoint:
    file = folder / "slimlm.json"
    try:
        info = validate_slimlm_json(json.loads(file.read_text()), file)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e.msg} (line {e.lineno})") from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{file} is not UTF-8 text") from None
    config = read_config(folder)
    wfile = folder / "model.safetensors"
    if not wfile.is_file():
        raise CheckpointError(f"folder {folder} has no model.safetensors")
    tensors = read_safetensors(wfile)
    tokenizer = None
    if (folder / "tokenizer.json").is_file():
        from slimlm.loaders.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_dir(folder)
    return Checkpoint(config=config, tensors=tensors, tokenizer=tokenizer, source=str(folder), format="slimlm",
                      file_bytes=wfile.stat().st_size, meta={"slimlm": info})


def dense_runtime_tensors(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Runtime-named dense tensors: compressed modules expanded with ``dense_weight()`` (for exports)."""
    runtime: dict[str, torch.Tensor] = {}
    swapped = {name: m for name, m in model.named_modules() if isinstance(m, SwappableLinear)}
    for name, t in _state_dict(model).items():
        if any(name.startswith(p + ".") for p in swapped):
            continue
        runtime[name] = t.to(dtype) if t.is_floating_point() else t
    for name, m in swapped.items():
        runtime[name + ".weight"] = m.dense_weight().detach().to(dtype)
        bias = m.bias
        if isinstance(bias, torch.Tensor):
            runtime[name + ".bias"] = bias.detach().to(dtype)
    return runtime


def head_tying(model: Transformer, hf_cfg: dict[str, Any]) -> bool:
    """Whether an export drops ``lm_head`` as the embedding's duplicate. A tied model whose head was
    swapped (e.g. quantized) has a head of its own: ``hf_cfg`` is switched to ``tie_word_embeddings:
    false`` so HF readers do not re-tie the head to the dense embedding."""
    tied = model.ties_lm_head()
    if model.config.tie_word_embeddings and not tied:
        hf_cfg["tie_word_embeddings"] = False
    return tied


def export_hf(lm: Any, out: str | Path, overwrite: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Export a plain HF folder (dense weights; compressed modules are expanded with dense_weight)."""
    out = check_output_dir(out, overwrite)
    model: Transformer = lm.model
    dtype = dtype or (model.dtype if model.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32)
    runtime = dense_runtime_tensors(model, dtype)
    hf_cfg = model.config.to_hf_config()
    tied = head_tying(model, hf_cfg)
    hf_tensors = runtime_to_hf(model.config, runtime, tied)
    hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")
    hf_cfg.pop("quantization_config", None)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        save_file({k: v.contiguous() for k, v in hf_tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        if lm.tokenizer is not None:
            lm.tokenizer.save(tmp)

    return atomic_dir(out, write, kind="hf")
