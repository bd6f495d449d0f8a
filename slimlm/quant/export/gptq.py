"""GPTQ checkpoint export (the AutoGPTQ / GPTQModel / transformers ``quant_method: gptq`` layout).

Per quantized linear ``name`` with ``bits`` b, ``G`` groups of ``group_size`` (a ragged last group is
allowed: ``G = ceil(in / group_size)``):

- ``name.qweight`` int32 ``[ceil(in*b/32), out]``: codes packed along the *input* dim, input row ``i`` at
  bit ``i*b`` of the column's bit stream (for 4 bits: 8 rows per word, row ``8r+j`` at bits ``4j``;
  3 bits: 32 rows in 3 words, values straddle words as in AutoGPTQ);
- ``name.qzeros`` int32 ``[G, ceil(out*b/32)]``: zeros packed along the *output* dim; format ``gptq``
  (v1) stores ``zero - 1`` (the historic offset readers add back), ``gptq_v2`` stores ``zero``;
- ``name.scales`` float16 ``[G, out]``; ``name.g_idx`` int32 ``[in]`` (group of each input row);
- ``name.bias`` float16 when present.

``w[o, i] = (q[i, o] - zero[g_idx[i], o]) * scales[g_idx[i], o]``. ``config.json`` gets
``quantization_config`` {quant_method: gptq, bits, group_size, desc_act, sym, checkpoint_format} and the
folder also holds ``quantize_config.json`` (the same keys). All linears must share bits / group size /
symmetry (the format has one global setting). The float16 scales round our float32 ones.
Tested by an independent unpack: ``.venv/bin/pytest tests/quant/test_export.py -k gptq``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from slimlm.quant.export.common import ExportParts, is_default_g_idx, write_folder
from slimlm.quant.packing import pack_int32
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import SlimlmError

FORMATS = ("gptq", "gptq_v2")


def gptq_tensors(name: str, qw: QuantizedWeight, checkpoint_format: str = "gptq") -> dict[str, torch.Tensor]:
    """The GPTQ tensors of one linear (see the module docstring for the layout)."""
    if checkpoint_format not in FORMATS:
        raise SlimlmError(f"checkpoint_format must be one of {FORMATS}, got {checkpoint_format!r}")
    if qw.bits not in (2, 3, 4, 8):
        raise SlimlmError(f"{name}: GPTQ checkpoints hold 2, 3, 4 or 8 bits, got {qw.bits}")
    mask = (1 << qw.bits) - 1
    zero = qw.zero.to(torch.int64)  # [out, G]
    if checkpoint_format == "gptq":
        if bool((zero == 0).any()):
            raise SlimlmError(f"{name}: a zero point of 0 cannot be stored in GPTQ v1 (zero - 1 = -1); "
                              "use checkpoint_format='gptq_v2'")
        zero = zero - 1
    scales = qw.scale.float().t().contiguous()  # [G, out]
    if bool((scales.abs() > 65504).any()):
        raise SlimlmError(f"{name}: a scale exceeds the float16 range of GPTQ scales")
    return {
        f"{name}.qweight": pack_int32(qw.qweight.t().contiguous(), qw.bits, dim=0),  # [in*b/32, out]
        f"{name}.qzeros": pack_int32((zero & mask).t().contiguous(), qw.bits, dim=-1),  # [G, out*b/32]
        f"{name}.scales": scales.half(),
        f"{name}.g_idx": qw.group_index().to(torch.int32),
    }


def gptq_quantize_config(quantized: dict[str, QuantizedWeight], checkpoint_format: str = "gptq") -> dict[str, Any]:
    """The shared settings (``quantize_config.json``); raises if the linears disagree.

    A per-channel linear (one group) fits a global ``group_size`` at least as wide as its rows, since
    ``ceil(in / group_size) = 1`` there too (e.g. g64 on a model whose attention rows are 64 wide).
    """
    if not quantized:
        raise SlimlmError("no quantized linear to export")
    bits = sorted({qw.bits for qw in quantized.values()})
    syms = {qw.symmetric for qw in quantized.values()}
    groups = sorted({qw.group_size for qw in quantized.values() if qw.group_size < qw.shape[1]})
    group = groups[0] if groups else -1
    too_wide = [n for n, qw in quantized.items() if qw.group_size >= qw.shape[1] and group != -1 and qw.shape[1] > group]
    if len(bits) > 1 or len(syms) > 1 or len(groups) > 1 or too_wide:
        found = (f"{'/'.join(map(str, bits))} bits" if len(bits) > 1 else "symmetric and asymmetric linears"
                 if len(syms) > 1 else f"group sizes {groups + (['per-channel'] if too_wide else [])}")
        raise SlimlmError(f"a GPTQ checkpoint holds one bits/group_size/sym setting for every linear, this model has "
                          f"{found}: export --to compressed-tensors (one config group per setting) or quantize uniformly")
    desc_act = any(not is_default_g_idx(qw) for qw in quantized.values())
    return {"bits": bits[0], "group_size": group, "desc_act": desc_act, "sym": syms.pop(), "true_sequential": True,
            "static_groups": False, "damp_percent": 0.01, "checkpoint_format": checkpoint_format,
            "lm_head": "lm_head" in quantized}


def export_gptq(parts: ExportParts, out: str | Path, checkpoint_format: str = "gptq", overwrite: bool = False,
                tokenizer: Any = None) -> Path:
    """Write a Hugging Face folder in the GPTQ layout (config.json + quantize_config.json + safetensors).

    Example::

        export_gptq(split_model(lm.model), "out/gptq-w4g128", tokenizer=lm.tokenizer)
    """
    qcfg = gptq_quantize_config(parts.quantized, checkpoint_format)
    tensors: dict[str, torch.Tensor] = {}
    for name, qw in parts.quantized.items():
        tensors.update(gptq_tensors(name, qw, checkpoint_format))
        if name in parts.biases:
            tensors[f"{name}.bias"] = parts.biases[name].half()
    clash = set(tensors) & set(parts.tensors)
    if clash:
        raise SlimlmError(f"tensor {sorted(clash)[0]!r} is both quantized and unquantized")
    tensors.update(parts.tensors)
    config = dict(parts.config)
    config["quantization_config"] = {"quant_method": "gptq", **qcfg}
    return write_folder(out, config, tensors, overwrite, extra_json={"quantize_config.json": qcfg},
                        tokenizer=tokenizer)
