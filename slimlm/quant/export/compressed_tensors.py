"""compressed-tensors ``pack-quantized`` export (what vLLM and transformers load).

Per quantized linear ``name`` (``w = (q - zero) * scale`` with our unsigned codes):

- ``name.weight_packed`` int32 ``[out, ceil(in*bits/32)]``: the codes as a dense bit stream along the
  input dim (element ``i`` at bit ``i*bits``). compressed-tensors stores *signed* values plus
  ``2**(bits-1)``, which is exactly our unsigned code.
- ``name.weight_scale`` ``[out, groups]`` (``[out, 1]`` per channel) in ``scale_dtype`` (default float32:
  lossless; pass bfloat16/float16 to match a half-precision model).
- ``name.weight_zero_point`` int32 ``[ceil(out*bits/32), groups]`` (asymmetric only): our unsigned zero
  packed the same way along the *output* dim (again signed zero + ``2**(bits-1)``).
- ``name.weight_shape`` int64 ``[2]`` = ``[out, in]``.

compressed-tensors needs the group size to divide the row; a ragged last group (576 = 4 x 128 + 64)
is re-expressed exactly with the largest common divisor as group size and each scale repeated.
Non-trivial act-order ``g_idx`` is refused (GPTQ's act-order with static groups never produces one).

``config.json`` gains ``quantization_config = {quant_method: compressed-tensors, format: pack-quantized,
quantization_status: compressed, config_groups: {group_i: {targets: [module names], weights: {...}}},
ignore: [...]}``. Unquantized tensors (embeddings, norms, a kept ``lm_head``) are saved as they are.
Tested by decompressing with the ``compressed-tensors`` package: ``.venv/bin/pytest tests/quant/test_export.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from slimlm.quant.export.common import ExportParts, is_default_g_idx, write_folder
from slimlm.quant.packing import pack_int32
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import SlimlmError


def _effective_group(qw: QuantizedWeight) -> int:
    inp = qw.shape[1]
    return qw.group_size if inp % qw.group_size == 0 else math.gcd(qw.group_size, inp)


def weights_args(qw: QuantizedWeight) -> dict[str, Any]:
    """The ``weights`` entry of a config group for ``qw`` (QuantizationArgs fields)."""
    g = _effective_group(qw)
    per_channel = g == qw.shape[1]
    return {
        "num_bits": qw.bits, "type": "int", "symmetric": qw.symmetric,
        "strategy": "channel" if per_channel else "group", "group_size": None if per_channel else g,
        "dynamic": False, "actorder": None, "observer": "minmax", "block_structure": None,
    }  # fmt: skip


def ct_tensors(name: str, qw: QuantizedWeight, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one linear (see the module docstring for the layout)."""
    if not is_default_g_idx(qw):
        raise SlimlmError(f"{name}: compressed-tensors export needs static groups (g_idx = i // group_size); "
                          "use the GPTQ export for act-order g_idx")
    out, inp = qw.shape
    g = _effective_group(qw)
    src = (torch.arange(inp // g) * g) // qw.group_size  # each exported group's source group
    scale = qw.scale.float()[:, src]  # [out, in/g]
    t = {
        f"{name}.weight_packed": pack_int32(qw.qweight, qw.bits),
        f"{name}.weight_scale": scale.to(scale_dtype).contiguous(),
        f"{name}.weight_shape": torch.tensor([out, inp], dtype=torch.int64),
    }
    if not qw.symmetric:
        t[f"{name}.weight_zero_point"] = pack_int32(qw.zero[:, src].to(torch.int64), qw.bits, dim=0)
    return t


def ct_quantization_config(quantized: dict[str, QuantizedWeight], ignore: list[str]) -> dict[str, Any]:
    """``quantization_config`` for ``config.json``: one config group per distinct weights scheme."""
    groups: dict[str, dict[str, Any]] = {}
    keys: dict[str, str] = {}
    for name in sorted(quantized):
        args = weights_args(quantized[name])
        key = repr(sorted(args.items()))
        if key not in keys:
            keys[key] = f"group_{len(keys)}"
            groups[keys[key]] = {"targets": [], "weights": args, "input_activations": None,
                                 "output_activations": None, "format": "pack-quantized"}
        groups[keys[key]]["targets"].append(name)
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": groups, "ignore": ignore, "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {},
    }  # fmt: skip


def _ignored_linears(parts: ExportParts) -> list[str]:
    """Linears left unquantized: 2-D ``*.weight`` tensors that are not embeddings (+ a tied ``lm_head``)."""
    names = [n[: -len(".weight")] for n, t in parts.tensors.items()
             if n.endswith(".weight") and t.dim() == 2 and "embed" not in n and "wte" not in n and "wpe" not in n]
    if "lm_head" not in parts.quantized and "lm_head" not in names:
        names.append("lm_head")
    return sorted(names)


def export_compressed_tensors(parts: ExportParts, out: str | Path, scale_dtype: torch.dtype = torch.float32,
                              overwrite: bool = False, tokenizer: Any = None) -> Path:
    """Write a Hugging Face folder in compressed-tensors ``pack-quantized`` format.

    Example::

        parts = split_model(lm.model)  # or build ExportParts by hand
        export_compressed_tensors(parts, "out/ct-w4g128", tokenizer=lm.tokenizer)
    """
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in parts.quantized.items():
        tensors.update(ct_tensors(name, qw, scale_dtype))
        if name in parts.biases:
            tensors[f"{name}.bias"] = parts.biases[name].to(scale_dtype)
    clash = set(tensors) & set(parts.tensors)
    if clash:
        raise SlimlmError(f"tensor {sorted(clash)[0]!r} is both quantized and unquantized")
    tensors.update(parts.tensors)
    config = dict(parts.config)
    config["quantization_config"] = ct_quantization_config(parts.quantized, _ignored_linears(parts))
    return write_folder(out, config, tensors, overwrite, tokenizer=tokenizer)
