"""Adapters in peft's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are peft's for the Hugging Face model of the same base
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``): runtime module paths are mapped
with ``slimlm.models.families``, so ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads what
slimlm wrote and :func:`load_adapter` loads what peft wrote. Which method a folder holds comes from
its ``peft_type`` (the registry), never from file names. The folder is written to a temporary
sibling and renamed into place; an existing folder that is not an adapter is never overwritten.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimlm.peft.base import AdapterLayer, adapter_modules, install
from slimlm.peft.registry import method_for_model, method_for_peft_type
from slimlm.peft.targets import linear_paths, to_hf_path, to_runtime_path
from slimlm.utils.errors import CheckpointError, SlimlmError

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


def _config_of(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "family"):
        raise SlimlmError("adapters are saved and loaded on a slimlm runtime model (lm.model)")
    return cfg


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None,
                 convert_pissa_to_lora: bool = False, adapter_name: str | None = None) -> Path:
    """Write the model's adapters (see module docstring); returns the folder. ``convert_pissa_to_lora``
    writes a PiSSA adapter as a plain rank-2r LoRA for the original (not the residual) base;
    ``adapter_name`` writes one of several resident LoRA adapters (default: the default one)."""
    cfg = _config_of(model)
    if adapter_name not in (None, "default"):
        from slimlm.peft.multi import named_tensors

        named_meta, named = named_tensors(model, adapter_name, PREFIX)
        named_meta["base_model_name_or_path"] = base_model_name_or_path
        _write(Path(folder), named_meta, named)
        return Path(folder)
    method = method_for_model(model)
    if method.model_tensors is not None and method.model_peft_config is not None:  # prompt tuning
        own = {k: t.detach().contiguous().clone() for k, t in method.model_tensors(model).items()}
        meta = method.model_peft_config(model.peft_config, model)
        meta["base_model_name_or_path"] = base_model_name_or_path
        _write(Path(folder), meta, own)
        return Path(folder)
    mods = adapter_modules(model)
    if not mods or method.to_peft_config is None:
        raise SlimlmError("this model has no adapters to save (apply_peft first)")
    if any(m.merged for m in mods.values()):
        raise SlimlmError("the adapters are merged into the base weights: unmerge them before saving")
    tensors: dict[str, torch.Tensor] = {}
    by_hf: dict[str, AdapterLayer] = {}
    for path, m in mods.items():
        hf = to_hf_path(cfg, path)
        by_hf[hf] = m
        for suffix, t in m.adapter_tensors().items():
            tensors[f"{PREFIX}{hf}.{suffix}"] = t.detach().contiguous().clone()
    all_hf = list(by_hf)  # every linear of the HF model: the wrapped ones and the others
    for n in linear_paths(model, AdapterLayer):
        try:
            all_hf.append(to_hf_path(cfg, n))
        except SlimlmError:
            pass
    meta = method.to_peft_config(model.peft_config, by_hf, all_hf)
    meta["base_model_name_or_path"] = base_model_name_or_path
    if convert_pissa_to_lora:
        from slimlm.peft.lora.model import pissa_as_lora

        pissa_as_lora(meta, tensors, by_hf, PREFIX)  # type: ignore[arg-type]
    _write(Path(folder), meta, tensors)
    return Path(folder)


def _write(out: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / CONFIG).exists())):
        raise SlimlmError(f"{out} exists and is not an adapter folder: choose another path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_adapter(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config.json, tensors) of a peft-layout folder, with clear errors."""
    f = Path(folder)
    if not (f / CONFIG).is_file():
        raise CheckpointError(f"{f} is not an adapter folder (no {CONFIG})")
    if not (f / WEIGHTS).is_file():
        raise CheckpointError(f"{f} has no {WEIGHTS} (adapter_model.bin is not read: it needs pickle)")
    try:
        meta = json.loads((f / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f / CONFIG} is not JSON: {e}") from None
    return meta, load_file(str(f / WEIGHTS))


def module_parts(method: Any, tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """HF module path -> {peft key suffix: tensor} of an adapter file (peft's adapter-name infix dropped)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".default.", ".")  # keys saved with the adapter name kept
        if name.endswith(".default"):
            name = name[: -len(".default")]
        suffix = next((s for s in method.key_suffixes if name.endswith("." + s)), None)
        if suffix is None and name.endswith(".weight"):  # e.g. lora_magnitude_vector.weight
            suffix = next((s for s in method.key_suffixes if name.endswith("." + s + ".weight")), None)
            name = name[: -len(".weight")] if suffix else name
        if suffix is None:
            raise CheckpointError(f"adapter tensor {key!r} is not one of {method.name}'s ({', '.join(method.key_suffixes)})")
        parts.setdefault(name[: -len(suffix) - 1], {})[suffix] = t
    return parts


def load_adapter(model: nn.Module, folder: str | Path, adapter_name: str | None = None) -> list[str]:
    """Wrap the model's linears with the adapters of a peft-layout ``folder``; returns the runtime
    paths wrapped. Nothing changes when the adapter does not fit the model.

    With ``adapter_name`` (LoRA on a model that already carries a default LoRA adapter) the folder's
    adapter is added next to the others under that name (:mod:`slimlm.peft.multi`)."""
    cfg = _config_of(model)
    meta, tensors = read_adapter(folder)
    if adapter_name not in (None, "default"):
        from slimlm.peft.multi import load_named

        return load_named(model, adapter_name, meta, tensors)
    method = method_for_peft_type(str(meta.get("peft_type")))
    pcfg = method.from_peft_config(meta)
    if adapter_modules(model) or "prompt_encoder" in model._modules or "prefix_encoder" in model._modules:
        raise SlimlmError("this model already carries adapters: unload them first")
    if method.load_model_tensors is not None:  # prompt tuning
        paths = method.load_model_tensors(model, {k.removeprefix(PREFIX): t for k, t in tensors.items()}, pcfg)
        model.peft_config = pcfg  # type: ignore[assignment]
        return paths
    assert method.build is not None
    parts = module_parts(method, tensors)
    wrapped: dict[str, AdapterLayer] = {}
    for hf_path, ts in parts.items():
        path = to_runtime_path(cfg, hf_path)
        try:
            base = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"adapter module {hf_path!r} ({path}) is not in this model") from None
        w = method.build(base, ts, pcfg, repr(hf_path))
        assert isinstance(w, AdapterLayer)
        wrapped[path] = w
    install(model, wrapped)
    model.peft_config = pcfg  # type: ignore[assignment]
    return sorted(wrapped)
