"""Which linears of a model a PEFT config targets, and their Hugging Face names for peft's files."""

from __future__ import annotations

import re

import torch
from torch import nn

from slimlm.models.families import hf_to_runtime, runtime_to_hf
from slimlm.models.modules import SwappableLinear
from slimlm.utils.errors import ConfigError, SlimlmError


def is_linear(m: nn.Module) -> bool:
    return type(m) is nn.Linear or isinstance(m, SwappableLinear)


def linear_paths(model: nn.Module, wrapper: type[nn.Module]) -> list[str]:
    """Runtime paths of the linears a method may wrap (not those inside an adapter wrapper)."""
    out, inside = [], []
    for name, m in model.named_modules():
        if isinstance(m, wrapper):
            inside.append(name + ".")
        elif is_linear(m) and not any(name.startswith(p) for p in inside):
            out.append(name)
    return out


def match_targets(model: nn.Module, targets: list[str] | str, wrapper: type[nn.Module]) -> list[str]:
    """Paths matching ``targets`` (leaf names, or one regex over the whole path); a clear error otherwise."""
    if any(isinstance(m, wrapper) for m in model.modules()):
        raise SlimlmError(f"this model already carries {wrapper.__name__} adapters: unload them first")
    return select_paths(linear_paths(model, wrapper), targets)


def select_paths(paths: list[str], targets: list[str] | str) -> list[str]:
    """The ``paths`` that ``targets`` (leaf names, or one regex over the whole path) select; a clear error otherwise."""
    if isinstance(targets, str):
        try:
            rx = re.compile(targets)
        except re.error as e:
            raise ConfigError(f"target_modules {targets!r} is not a valid regular expression: {e}") from None
        hit = [p for p in paths if rx.fullmatch(p)]
    else:
        hit = [p for p in paths if any(p == t or p.endswith("." + t) for t in targets)]
        missing = [t for t in targets if not any(p == t or p.endswith("." + t) for p in paths)]
        if missing and hit:
            raise ConfigError(f"target_modules {missing} match no linear; linear names here: {_leaves(paths)}")
    if not hit:
        raise ConfigError(f"target_modules {targets!r} match no linear; linear names here: {_leaves(paths)} "
                          f"(e.g. path {paths[0] if paths else '-'})")
    return hit


def _leaves(paths: list[str]) -> str:
    return ", ".join(sorted({p.rsplit(".", 1)[-1] for p in paths}))


def to_hf_path(cfg, path: str) -> str:  # type: ignore[no-untyped-def]
    """Runtime module path -> the Hugging Face module path of the same family."""
    if path == "lm_head":
        return path
    try:
        names = list(runtime_to_hf(cfg, {path + ".weight": torch.zeros(1, 1)}, tied=False))
    except (KeyError, SlimlmError):
        names = []
    if len(names) != 1 or not names[0].endswith(".weight"):
        raise SlimlmError(f"{path} has no module of its own in the {cfg.architecture} checkpoint layout "
                          "(GPT-2 fuses q/k/v into c_attn): peft's format cannot hold an adapter on it")
    return names[0][: -len(".weight")]


def to_runtime_path(cfg, hf_path: str) -> str:  # type: ignore[no-untyped-def]
    """Hugging Face module path -> runtime module path (the inverse of :func:`to_hf_path`)."""
    if hf_path == "lm_head":
        return hf_path
    try:
        names = list(hf_to_runtime(cfg, {hf_path + ".weight": torch.zeros(1, 1)}))
    except SlimlmError:
        names = []
    if len(names) != 1:
        raise SlimlmError(f"adapter module {hf_path!r} has no single counterpart in slimlm's {cfg.architecture} runtime")
    return names[0][: -len(".weight")]


def peft_targets(hf_paths: list[str], all_hf_linears: list[str]) -> list[str] | str:
    """peft's ``target_modules`` for exactly ``hf_paths``: their leaf names when those select no other
    linear of the HF model, else a regex of the exact paths (peft full-matches a string)."""
    leaves = sorted({p.rsplit(".", 1)[-1] for p in hf_paths})
    by_leaf = {p for p in all_hf_linears if p.rsplit(".", 1)[-1] in leaves}
    if by_leaf == set(hf_paths):
        return leaves
    return "(" + "|".join(re.escape(p) for p in sorted(hf_paths)) + ")"
