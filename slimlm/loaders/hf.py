"""Read a Hugging Face model folder: config.json + (sharded) safetensors, or .bin via weights_only."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from slimlm.loaders.types import Checkpoint
from slimlm.utils.errors import CheckpointError


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise CheckpointError(f"folder {folder} has no config.json (not a Hugging Face model folder)")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e.msg} at line {e.lineno}") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return cfg


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file, copied out of its memory map one by one; truncation/corruption
    -> CheckpointError.

    Why copy: a tensor served from the map keeps the whole map alive, and every page a load touched
    stays resident with it: after q|k|v fusion (which copies those weights) or a dtype conversion, the
    file's pages of the replaced tensors would stay in RSS next to their copies.
    """
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).clone()
    except Exception as e:  # safetensors raises its own error types for bad headers / short files
        raise CheckpointError(f"cannot read {path}: truncated or corrupt safetensors file ({str(e).splitlines()[0]})") from None
    return out


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in load order: safetensors (index-aware) or pytorch .bin."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError):
                raise CheckpointError(f"{index} is not a valid shard index (needs a weight_map)") from None
            files = sorted({folder / f for f in wm.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} lists missing shard file {missing[0]}")
            return files
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    shards = sorted(folder.glob("model-*.safetensors"))
    if shards:
        return shards
    binf = folder / "pytorch_model.bin"
    if binf.is_file():
        return [binf]
    raise CheckpointError(f"folder {folder} has no model.safetensors, shard index or pytorch_model.bin")


def read_hf_folder(folder: Path, with_tokenizer: bool = True) -> Checkpoint:
    config = read_config(folder)
    tensors: dict[str, torch.Tensor] = {}
    total = 0
    for f in weight_files(folder):
        total += f.stat().st_size
        if f.suffix == ".safetensors":
            tensors.update(read_safetensors(f))
        else:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True)  # read, not mapped (see read_safetensors)
            except Exception as e:
                raise CheckpointError(f"cannot read {f} with weights_only=True: {str(e).splitlines()[0]}") from None
            tensors.update(sd)
    tokenizer = None
    if with_tokenizer and (folder / "tokenizer.json").is_file():
        from slimlm.loaders.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_hf_dir(folder)
    return Checkpoint(config=config, tensors=tensors, tokenizer=tokenizer, source=str(folder), format="hf",
                      file_bytes=total)
