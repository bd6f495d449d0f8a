"""The one module-pattern syntax of every transform config (``ignore``, ``overrides``, ``layer_sparsity``).

Patterns match full module paths (``model.layers.3.mlp.down_proj``): a glob matches the path or any
dotted suffix of it (``down_proj``, ``mlp.*_proj``, ``layers.0.*``, ``model.layers.0.*``), and a
pattern starting with ``re:`` is a regular expression searched in the path.
"""

from __future__ import annotations

import fnmatch
import re

import torch

from slimlm.utils.errors import ConfigError

# Linears of a decoder layer that read the same input, in forward order (runtime names relative to
# the layer): the calibrated transforms capture and compress them group by group.
SHARED_INPUT_GROUPS: list[list[str]] = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]
DECODER_LINEARS: list[str] = [p for g in SHARED_INPUT_GROUPS for p in g]


def has_module(root: torch.nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def path_matches(pattern: str, path: str) -> bool:
    """True when ``pattern`` (glob on the path or a dotted suffix; ``re:`` = regex) names ``path``."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], path) is not None
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern)


def matches_any(patterns: list[str] | tuple[str, ...], path: str) -> bool:
    return any(path_matches(p, path) for p in patterns)


def check_patterns(patterns: list[str], owner: str) -> None:
    """ConfigError naming a pattern whose ``re:`` part is not a valid regular expression."""
    for pat in patterns:
        if not isinstance(pat, str):
            raise ConfigError(f"{owner}: module patterns must be strings, got {pat!r}")
        if pat.startswith("re:"):
            try:
                re.compile(pat[3:])
            except re.error as e:
                raise ConfigError(f"{owner}: bad regex {pat!r}: {e}") from None
