"""What every exporter shares: the split of a model into quantized linears and plain tensors, and the
atomic folder write.

The exporters themselves are pure functions of ``{HF module path: QuantizedWeight}`` (+ biases, + the
unquantized tensors under HF names) and the HF ``config.json`` dict; :func:`split_model` produces those
from a loaded slimlm model (runtime linear paths are HF paths for llama-family models; names are
mapped through ``slimlm.models.families.runtime_to_hf`` so other families work too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slimlm.models.modules import SwappableLinear
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import SlimlmError


@dataclass
class ExportParts:
    """A model ready for export: HF config, quantized linears and every other tensor, under HF names."""

    config: dict[str, Any]
    quantized: dict[str, QuantizedWeight]  # HF module path (no ".weight") -> codes + scales
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # HF tensor name -> float tensor
    biases: dict[str, torch.Tensor] = field(default_factory=dict)  # HF module path -> [out]


def _hf_module_name(cfg: Any, path: str, tied: bool) -> str:
    from slimlm.models.families import runtime_to_hf

    if getattr(cfg, "family", "") == "gpt2":
        raise SlimlmError("quantized export of GPT-2 (fused Conv1D qkv) is not supported")
    names = list(runtime_to_hf(cfg, {path + ".weight": torch.zeros(1)}, tied))
    if len(names) != 1 or not names[0].endswith(".weight"):
        raise SlimlmError(f"cannot map runtime linear {path!r} to a Hugging Face name")
    return names[0][: -len(".weight")]


def refuse_unholdable(model: Any, target: str) -> None:
    """One-line error when ``target`` (a quantized-checkpoint format) cannot hold some swapped linears:
    those without ``to_quantized()`` (NF4, W8A8, int8-outlier, sparse, low-rank) would silently become
    dense weights there."""
    kinds: dict[str, list[str]] = {}
    for path, m in model.named_modules():
        if isinstance(m, SwappableLinear) and getattr(type(m), "to_quantized", None) is None:
            kinds.setdefault(str(getattr(m, "kind", type(m).__name__)), []).append(path)
    if kinds:
        kind, paths = sorted(kinds.items())[0]
        more = f" and {len(paths) - 1} more" if len(paths) > 1 else ""
        others = f" (also: {', '.join(sorted(kinds)[1:])})" if len(kinds) > 1 else ""
        raise SlimlmError(f"{target} cannot hold {kind} linears ({paths[0]}{more}){others}: export --to hf "
                          "(dense weights) or --to gguf (re-quantized)")


def split_model(model: Any, target: str | None = None) -> ExportParts:
    """Split a slimlm ``Transformer`` into :class:`ExportParts` (modules with ``to_quantized()`` are
    quantized; other swapped modules are expanded with ``dense_weight()``, or refused with one line when
    ``target`` names a quantized format, see :func:`refuse_unholdable`)."""
    if target is not None:
        refuse_unholdable(model, target)
    from slimlm.loaders.save import head_tying
    from slimlm.models.families import runtime_to_hf

    cfg = model.config
    tied = model.ties_lm_head()  # a swapped (quantized) head of a tied model is exported as its own
    swapped = {n: m for n, m in model.named_modules() if isinstance(m, SwappableLinear)}
    runtime: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if not any(name.startswith(p + ".") for p in swapped):
            runtime[name] = t.detach()
    quantized: dict[str, QuantizedWeight] = {}
    biases: dict[str, torch.Tensor] = {}
    for path, m in swapped.items():
        bias = getattr(m, "bias", None)
        to_quantized = getattr(type(m), "to_quantized", None)
        if to_quantized is not None:
            hf = _hf_module_name(cfg, path, tied)
            quantized[hf] = to_quantized(m)
            if isinstance(bias, torch.Tensor):
                biases[hf] = bias.detach().float()
        else:
            runtime[path + ".weight"] = m.dense_weight().detach().float()
            if isinstance(bias, torch.Tensor):
                runtime[path + ".bias"] = bias.detach().float()
    hf_config = cfg.to_hf_config()
    head_tying(model, hf_config)
    if tied:
        runtime.pop("lm_head.weight", None)
    return ExportParts(hf_config, quantized, runtime_to_hf(cfg, runtime, tied), biases)


def write_folder(out: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor], overwrite: bool,
                 extra_json: dict[str, dict[str, Any]] | None = None, tokenizer: Any = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ extra JSON files, + tokenizer) atomically."""
    from slimlm.loaders.save import atomic_dir, check_output_dir

    out_dir = check_output_dir(out, overwrite)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for fname, obj in (extra_json or {}).items():
            (tmp / fname).write_text(json.dumps(obj, indent=2))
        if tokenizer is not None:
            tokenizer.save(tmp)

    return atomic_dir(out_dir, write)


def is_default_g_idx(qw: QuantizedWeight) -> bool:
    """True when ``g_idx`` is absent or equals ``i // group_size`` (static groups)."""
    if qw.g_idx is None:
        return True
    return bool(torch.equal(qw.g_idx.long(), torch.arange(qw.shape[1]) // qw.group_size))
