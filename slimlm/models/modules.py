"""Swappable linear modules: the seam every compression method plugs into.

A decoder's projections start as ``nn.Linear``. Quantization, sparsity and low-rank factorization
replace them with subclasses of :class:`SwappableLinear`, registered by a ``kind`` string. A slimlm
checkpoint records ``{module path: {"kind": ..., "spec": {...}}}`` in its versioned ``slimlm.json``;
loading builds each module empty with :meth:`SwappableLinear.create` (vLLM's *create weights*),
loads the state dict (*load*), then calls :meth:`process_after_loading` (*process weights after
loading*: e.g. repack into the CPU kernel layout, kept in non-persistent buffers so the checkpoint
layout stays portable), and ``forward`` is *apply*.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

_REGISTRY: dict[str, type[SwappableLinear]] = {}


class SwappableLinear(nn.Module):
    """Base class for a module that stands in for ``nn.Linear(in_features, out_features)``.

    Subclasses set ``kind`` and implement ``create``, ``spec``, ``dense_weight`` and ``forward``
    (``x: [..., in] -> [..., out]``). Only persistent buffers/parameters go to the checkpoint.
    """

    kind: ClassVar[str] = ""
    in_features: int
    out_features: int

    @classmethod
    def create(cls, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> SwappableLinear:
        """Build the module with empty (zero) storage of the right shapes, ready for load_state_dict."""
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        """JSON-serializable constructor arguments (besides in/out features and bias)."""
        raise NotImplementedError

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense weight ``[out, in]`` (float32), for export and reference checks."""
        raise NotImplementedError

    def process_after_loading(self) -> None:
        """Convert the portable checkpoint layout into the fast runtime layout (default: nothing)."""

    def decode_spec(self) -> Any:
        """How slimlm's decode kernels run this layer (a ``kernels.LinearSpec`` that
        ``process_after_loading`` keeps in ``__dict__["_decode"]``, which the decoder layer's one-call
        plan re-validates by identity), or None: the layer runs through ``forward``."""
        return self.__dict__.get("_decode")

    @property
    def has_bias(self) -> bool:
        return getattr(self, "bias", None) is not None


def register_linear_kind(cls: type[SwappableLinear]) -> type[SwappableLinear]:
    """Class decorator: make ``cls`` loadable from a checkpoint under ``cls.kind``."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    if cls.kind in _REGISTRY and _REGISTRY[cls.kind] is not cls:
        raise ValueError(f"linear kind {cls.kind!r} registered twice")
    _REGISTRY[cls.kind] = cls
    return cls


def linear_kinds() -> dict[str, type[SwappableLinear]]:
    return dict(_REGISTRY)


def build_linear(kind: str, in_features: int, out_features: int, bias: bool, spec: dict[str, Any]) -> SwappableLinear:
    if kind not in _REGISTRY:
        raise KeyError(f"unknown linear kind {kind!r}; known: {sorted(_REGISTRY)}")
    return _REGISTRY[kind].create(in_features, out_features, bias, spec)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """Dense ``[out, in]`` weight of an ``nn.Linear`` or a :class:`SwappableLinear`."""
    if isinstance(module, SwappableLinear):
        return module.dense_weight()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"not a linear module: {type(module).__name__}")
