"""A model's shapes from its config alone: no weight is read (``config.json``, GGUF metadata, ``slimlm.json``).

Why: the planner answers "does it fit, how fast" before anything is loaded. The runtime itself is
built on the meta device (``Transformer(config)`` under ``torch.device("meta")``: shapes, no storage),
so every linear, embedding and norm the runtime would hold is listed exactly as slimlm builds it,
for every supported family, without a second description of the architectures here.

What comes back (:class:`ModelShape`): the runtime ``ModelConfig``; each linear ``(path, in, out,
bias)``; the float parameters that are no linear (embeddings, norms, learned positions); whether
``lm_head`` shares the embedding; and the stored layout where the checkpoint has one (GGUF tensor
types by runtime path; a slimlm output's module kinds and specs), for the ``native`` format.

Example::

    shape = read_shape("smollm2-135m")     # GGUF header only: well under a second
    print(shape.n_params, len(shape.linears))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm.loaders.resolve import resolve
from slimlm.models.config import ModelConfig
from slimlm.utils.errors import CheckpointError


@dataclass(frozen=True)
class LinearShape:
    path: str  # runtime module path, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int
    bias: bool

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@dataclass
class ModelShape:
    config: ModelConfig
    source: str
    format: str  # "gguf" | "hf" | "slimlm"
    linears: list[LinearShape]
    other_params: dict[str, int]  # non-linear parameters: name -> numel (embeddings, norms, positions)
    tied: bool  # lm_head shares embed_tokens (no linear of its own is stored)
    file_bytes: int = 0
    gguf_types: dict[str, str] = field(default_factory=dict)  # runtime module path -> GGUF type name
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)  # slimlm.json "modules"
    checkpoint_dtype: str = "fp32"  # float dtype a load reads (GGUF: de-quantized to fp32; HF: torch_dtype)

    @property
    def n_params(self) -> int:
        """Parameters as the runtime counts them (a tied head once)."""
        return sum(lin.numel + (lin.out_features if lin.bias else 0) for lin in self.linears) + \
            sum(self.other_params.values())

    @property
    def n_non_embedding(self) -> int:
        """Parameters without the token embedding and (untied) output head: Chinchilla's N."""
        emb = self.other_params.get("model.embed_tokens.weight", 0)
        head = sum(lin.numel for lin in self.linears if lin.path == "lm_head")
        return self.n_params - emb - head

    def decoder_linears(self) -> list[LinearShape]:
        return [lin for lin in self.linears if lin.path != "lm_head"]


def shape_from_config(hf_config: dict[str, Any], source: str = "config", fmt: str = "hf") -> ModelShape:
    """Shapes of the runtime built from an HF config dict (on the meta device: no memory, no weights)."""
    from slimlm.models.transformer import Transformer

    config = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = Transformer(config)
    tied = bool(model.ties_lm_head())
    linears: list[LinearShape] = []
    in_linear: set[str] = set()
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            if name == "lm_head" and tied:
                continue
            linears.append(LinearShape(name, mod.in_features, mod.out_features, mod.bias is not None))
            in_linear.update({f"{name}.weight", f"{name}.bias"})
    other = {n: p.numel() for n, p in model.named_parameters() if n not in in_linear and n != "lm_head.weight"}
    stored = str(hf_config.get("torch_dtype") or hf_config.get("dtype") or "float32")
    ck = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(stored, "fp32")
    return ModelShape(config=config, source=source, format=fmt, linears=linears, other_params=other, tied=tied,
                      checkpoint_dtype="fp32" if fmt == "gguf" else ck)


def read_shape(spec: str) -> ModelShape:
    """Shapes of MODEL (alias, .gguf, HF folder, slimlm output dir) from its header/config only."""
    path, kind = resolve(spec)
    if kind == "gguf":
        return _gguf_shape(path)
    from slimlm.loaders.hf import read_config, weight_files

    shape = shape_from_config(read_config(path), str(path), kind)
    try:
        shape.file_bytes = sum(f.stat().st_size for f in weight_files(path))
    except CheckpointError:
        shape.file_bytes = 0  # a config without weights still plans
    if kind == "slimlm":
        from slimlm.loaders.schema import validate_slimlm_json

        file = path / "slimlm.json"
        try:
            info = validate_slimlm_json(json.loads(file.read_text()), file)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file} is not valid JSON: {e}") from None
        shape.modules = dict(info.get("modules", {}))
    return shape


def _gguf_shape(path: Path) -> ModelShape:
    from slimlm.loaders.gguf_reader import (
        HF_ARCHS,
        SUPPORTED_ARCHS,
        GGUFFile,
        gguf_to_hf_config,
        gguf_to_hf_name,
    )
    from slimlm.models.families import hf_to_runtime

    f = GGUFFile(path)  # header only: tensor data stays in the memory map, untouched
    arch = f.metadata.get("general.architecture")
    if arch not in HF_ARCHS:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    names = [t.name for t in f.tensors]
    embed = next((t for t in f.tensors if t.name == "token_embd.weight"), None)
    rows = int(embed.shape[1]) if embed is not None and len(embed.shape) == 2 else None
    shape = shape_from_config(gguf_to_hf_config(arch, f.metadata, names, rows), str(path), "gguf")
    shape.file_bytes = path.stat().st_size
    hf_types = {n: t.qtype.name for t in f.tensors if (n := gguf_to_hf_name(arch, t.name)) is not None}
    empty = {n: torch.empty(0) for n in hf_types}
    try:  # HF names -> runtime names (the GPT-2 fused c_attn splits in three; then it has no one type)
        runtime = hf_to_runtime(shape.config, dict(empty)) if shape.config.family != "gpt2" else {}
    except CheckpointError:
        runtime = {}
    by_obj = {id(t): n for n, t in empty.items()}
    for rname, t in runtime.items():
        hf = by_obj.get(id(t))
        if hf is not None and rname.endswith(".weight"):
            shape.gguf_types[rname[: -len(".weight")]] = hf_types[hf]
    return shape
