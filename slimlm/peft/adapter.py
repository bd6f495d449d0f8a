"""Adapters in peft's layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

Tensor keys are peft's for the Hugging Face model of the same base
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``): runtime module paths are mapped
with ``slimlm.models.families``, so ``peft.PeftModel.from_pretrained(hf_model, folder)`` loads what
slimlm wrote and :func:`load_adapter` loads what peft wrote. The folder is written to a temporary
sibling and renamed into place; an existing folder that is not an adapter is never overwritten.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimlm.peft.lora.layer import LoraLinear
from slimlm.peft.lora.model import install
from slimlm.peft.registry import method_for_config, method_for_peft_type
from slimlm.peft.targets import linear_paths, to_hf_path, to_runtime_path
from slimlm.utils.errors import CheckpointError, SlimlmError

PREFIX = "base_model.model."
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_KEY = re.compile(r"^(?P<path>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|(?P<mag>lora_magnitude_vector)(?:\.weight)?)$")


def _config_of(model: nn.Module) -> Any:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "family"):
        raise SlimlmError("adapters are saved and loaded on a slimlm runtime model (lm.model)")
    return cfg


def lora_modules(model: nn.Module) -> dict[str, LoraLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLinear)}


def save_adapter(model: nn.Module, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the model's LoRA adapters (see module docstring); returns the folder."""
    cfg = _config_of(model)
    mods = lora_modules(model)
    lcfg = getattr(model, "peft_config", None)
    if not mods or lcfg is None:
        raise SlimlmError("this model has no LoRA adapters to save (apply_peft first)")
    if any(m.merged for m in mods.values()):
        raise SlimlmError("the adapters are merged into the base weights: unmerge them before saving")
    tensors: dict[str, torch.Tensor] = {}
    hf_paths = []
    for path, m in mods.items():
        hf = to_hf_path(cfg, path)
        hf_paths.append(hf)
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().clone()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().clone()
        if m.use_dora:
            tensors[f"{PREFIX}{hf}.lora_magnitude_vector"] = m.lora_magnitude_vector.detach().contiguous().clone()
    all_hf = list(hf_paths)  # every linear of the HF model: the wrapped ones and the others
    for n in linear_paths(model, LoraLinear):
        try:
            all_hf.append(to_hf_path(cfg, n))
        except SlimlmError:
            pass
    meta = method_for_config(lcfg).to_peft_config(lcfg, hf_paths, all_hf)
    meta["base_model_name_or_path"] = base_model_name_or_path
    out = Path(folder)
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
    return out


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


def load_adapter(model: nn.Module, folder: str | Path) -> list[str]:
    """Wrap the model's linears with the LoRA adapters of a peft-layout ``folder``; returns the
    runtime paths wrapped. Nothing changes when the adapter does not fit the model."""
    cfg = _config_of(model)
    meta, tensors = read_adapter(folder)
    lcfg = method_for_peft_type(str(meta.get("peft_type"))).from_peft_config(meta)
    if lora_modules(model):
        raise SlimlmError("this model already carries LoRA adapters: unload them first")
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        name = name.replace(".default.", ".")  # keys saved with the adapter name kept
        m = _KEY.match(name)
        if m is None:
            raise CheckpointError(f"adapter tensor {key!r} is not a LoRA A/B weight (slimlm reads LoRA only)")
        parts.setdefault(m.group("path"), {})[m.group("part") or m.group("mag")] = t
    wrapped: dict[str, LoraLinear] = {}
    need = {"lora_A", "lora_B"} | ({"lora_magnitude_vector"} if lcfg.use_dora else set())
    for hf_path, ab in parts.items():
        if set(ab) != need:
            raise CheckpointError(f"adapter for {hf_path!r} has {sorted(ab)}, expected {sorted(need)}")
        path = to_runtime_path(cfg, hf_path)
        try:
            base = model.get_submodule(path)
        except AttributeError:
            raise CheckpointError(f"adapter module {hf_path!r} ({path}) is not in this model") from None
        a, b = ab["lora_A"], ab["lora_B"]
        r = a.shape[0]
        if a.shape != (r, getattr(base, "in_features", -1)) or b.shape != (getattr(base, "out_features", -1), r):
            raise CheckpointError(f"adapter for {hf_path!r} has A {tuple(a.shape)} / B {tuple(b.shape)}, which do "
                                  f"not fit the model's layer: is it an adapter for another base model?")
        alpha = float(meta.get("lora_alpha", 8))
        scaling = alpha / (r**0.5 if lcfg.use_rslora else r)
        w = LoraLinear(base, r, scaling, lcfg.lora_dropout, "kaiming", dtype=a.dtype if a.is_floating_point() else torch.float32,
                       use_dora=lcfg.use_dora)
        with torch.no_grad():
            w.lora_A.weight.copy_(a)
            w.lora_B.weight.copy_(b)
            if lcfg.use_dora:
                mag = ab["lora_magnitude_vector"]
                if mag.shape != (w.out_features,):
                    raise CheckpointError(f"adapter for {hf_path!r} has a magnitude of shape {tuple(mag.shape)}, "
                                          f"the layer has {w.out_features} rows")
                w.lora_magnitude_vector.copy_(mag)
        wrapped[path] = w
    install(model, wrapped)
    model.peft_config = lcfg  # type: ignore[assignment]
    return sorted(wrapped)
