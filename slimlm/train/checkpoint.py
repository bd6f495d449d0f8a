"""Training checkpoints: atomic folders that resume a run bit for bit.

A checkpoint is ``ROOT/step-000123/`` (written to a temp sibling and renamed by
``slimlm.loaders.outputs.atomic_dir``, so a killed or interrupted run never leaves a half-written one,
and the previous complete checkpoint stays until the new one is in place):

- ``trainable.safetensors``: every trainable tensor under its runtime name (adapter or full model),
- ``adapter/``: the adapters in peft's layout (``slimlm.peft.save_adapter``; PEFT runs only),
- ``optimizer.pt``, ``scheduler.pt``, ``rng.pt``: their ``state_dict()``s and the torch / Python RNG
  states (read back with ``torch.load(weights_only=True)``),
- ``trainer_state.json``: step, data position, tokens seen, the train config and the model's
  fingerprint (architecture, shapes, trainable names), checked on resume so a checkpoint of another
  model or method is refused in one line.

Only the newest ``keep`` checkpoints are kept; older ones are deleted only when slimlm's marker says
slimlm wrote them as training checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimlm.loaders.outputs import atomic_dir, foreign_files, read_marker
from slimlm.utils.errors import CheckpointError, SlimlmError

KIND = "slimlm-train-checkpoint"
FORMAT_VERSION = 1
STATE = "trainer_state.json"


def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match: the architecture and the trainable tensors' names and shapes."""
    cfg = getattr(model, "config", None)
    arch = {k: getattr(cfg, k, None) for k in ("architecture", "family", "hidden_size", "num_hidden_layers",
                                               "vocab_size", "intermediate_size")}
    trainable = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    digest = hashlib.sha256(json.dumps(sorted(trainable.items())).encode()).hexdigest()[:16]
    return {"model": {k: v for k, v in arch.items() if v is not None}, "trainable": len(trainable),
            "trainable_digest": digest}


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(tuple(s["python"]) if not isinstance(s["python"], tuple) else s["python"])


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def save_checkpoint(root: Path, model: nn.Module, optimizer: Any, scheduler: Any, state: dict[str, Any],
                    keep: int = 2, optimizer_state: dict[str, Any] | None = None,
                    rank_rng: list[Any] | None = None) -> Path:
    """Write ``root/step-N`` atomically (see module docstring); returns it. A distributed run passes
    the optimizer state gathered to full tensors and every rank's RNG state (``rng.pt`` then holds
    rank 0's as usual plus ``ranks``: all of them)."""
    step = int(state["step"])
    out = step_dir(root, step)
    tensors = {n: t.detach().contiguous().clone() for n, t in trainable_tensors(model).items()}
    meta = {"format_version": FORMAT_VERSION, **state, "fingerprint": fingerprint(model)}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "trainable.safetensors"), metadata={"format": "pt"})
        if getattr(model, "peft_config", None) is not None:
            from slimlm.peft import save_adapter

            save_adapter(model, tmp / "adapter")
        torch.save(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = rng_state() if rank_rng is None else {**rank_rng[0], "ranks": rank_rng}
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE).write_text(json.dumps(meta, indent=2) + "\n")  # last: its presence = complete

    root.mkdir(parents=True, exist_ok=True)
    atomic_dir(out, write, kind=KIND)
    _prune(root, keep)
    return out


def checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints slimlm wrote under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.name.startswith("step-") and p.is_dir() and (p / STATE).is_file():
            marker = read_marker(p)
            if marker is not None and marker.get("kind") == KIND:
                found.append(p)
    return sorted(found)


def _prune(root: Path, keep: int) -> None:
    for p in checkpoints(root)[:-keep]:
        if not foreign_files(p):  # only what slimlm wrote there
            shutil.rmtree(p, ignore_errors=True)


def find_checkpoint(path: str | Path) -> Path:
    """``path`` itself when it is a checkpoint, else the newest complete checkpoint under it."""
    p = Path(path)
    if (p / STATE).is_file():
        return p
    found = checkpoints(p)
    if not found:
        raise CheckpointError(f"--resume {p}: no complete training checkpoint there (step-N folders with {STATE})")
    return found[-1]


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        meta = json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / STATE} cannot be read: {e}") from None
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt / STATE}: format_version {meta.get('format_version') if isinstance(meta, dict) else '?'} "
                              f"is not supported (this slimlm reads {FORMAT_VERSION})")
    return meta


def check_fits(meta: dict[str, Any], model: nn.Module, ckpt: Path) -> None:
    """Refuse a checkpoint written for another model (or another method / targets) in one line."""
    want, have = meta.get("fingerprint", {}), fingerprint(model)
    if want.get("model") != have["model"]:
        raise CheckpointError(f"--resume {ckpt}: the checkpoint was written for model {want.get('model')}, "
                              f"this model is {have['model']}")
    if want.get("trainable_digest") != have["trainable_digest"]:
        raise CheckpointError(f"--resume {ckpt}: the checkpoint trains {want.get('trainable')} tensors that differ from "
                              f"this run's {have['trainable']} (another method, rank or target modules?)")


def load_checkpoint(ckpt: Path, model: nn.Module, optimizer: Any, scheduler: Any, rank: int = 0,
                    world: int = 1) -> dict[str, Any]:
    """Restore trainable tensors, optimizer, scheduler and RNG from ``ckpt``; returns its trainer state.
    Rank ``rank`` of a ``world``-rank run takes its own RNG state when the checkpoint has one per rank
    of the same world size (else rank 0's: the data order does not depend on it)."""
    meta = read_state(ckpt)
    check_fits(meta, model, ckpt)
    try:
        tensors = load_file(str(ckpt / "trainable.safetensors"))
        opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
        sch = torch.load(ckpt / "scheduler.pt", weights_only=True)
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"--resume {ckpt}: cannot read the checkpoint ({str(e).splitlines()[0]})") from None
    params = trainable_tensors(model)
    if set(tensors) != set(params):
        raise SlimlmError(f"--resume {ckpt}: its tensors do not match this model's trainable ones")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[n])
    optimizer.load_state_dict(opt)
    scheduler.load_state_dict(sch)
    ranks = rng.get("ranks")
    set_rng_state(ranks[rank] if isinstance(ranks, list) and len(ranks) == world else rng)
    return meta
