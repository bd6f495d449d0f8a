"""``factorize_(model, FactorizeConfig, samples)``: replace linears by :class:`LowRankLinear`.

Plain SVD needs no data. The activation-aware variant accumulates each linear's input Gram matrix
``X X^T`` on the shared layer-by-layer driver (:func:`slimlm.calib.driver.run_layerwise`) and
whitens before truncating (see :mod:`slimlm.lowrank.svd`). The rank of each linear comes from a
target parameter ratio (``rank = floor(ratio * out * in / (out + in))``), an energy threshold on the
(whitened) singular values, or a fixed rank; a linear whose rank would not save parameters stays
dense.

Example::

    factorize_(lm.model, FactorizeConfig(ratio=0.8, activation_aware=True), samples)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.calib.hessian import HessianStore
from slimlm.lowrank.linear import LowRankLinear
from slimlm.lowrank.svd import (
    check_rank,
    rank_for_energy,
    rank_for_ratio,
    svd_factors,
    whitened_singular_values,
    whitened_svd_factors,
    whitening,
)
from slimlm.models.modules import linear_weight
from slimlm.models.transformer import Transformer
from slimlm.transforms import TransformConfig, TransformReport, register_transform
from slimlm.transforms.select import DECODER_LINEARS, has_module
from slimlm.utils.errors import ConfigError, SlimlmError

DEFAULT_TARGETS = DECODER_LINEARS


@dataclass
class FactorizeConfig(TransformConfig):
    """Low-rank factorization of the decoder's linear layers."""

    kind: ClassVar[str] = "factorize"
    family: ClassVar[str] = "factorize"
    ratio: float = field(default=0.8, metadata={"gt": 0, "max": 1, "help": "parameters kept per factorized linear, in (0, 1]"})
    energy: float = field(default=0.0, metadata={"min": 0, "max": 1, "help": "pick each rank by this fraction of singular-value energy (0 = use ratio)"})
    rank: int = field(default=0, metadata={"min": 0, "help": "fixed rank for every target (0 = use ratio/energy)"})
    activation_aware: bool = field(default=False, metadata={"help": "whiten by the calibration Gram matrix (SVD-LLM)"})
    damp: float = field(default=0.01, metadata={"min": 0, "lt": 1, "help": "activation-aware: Gram dampening, fraction of mean diagonal"})
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS), metadata={"help": "linear paths inside each layer"})
    ignore: list[str] = field(default_factory=list, metadata={"help": "module path patterns (glob on the path or a dotted suffix, or 're:<regex>') left dense"})

    def validate(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise ConfigError(f"ratio must be in (0, 1], got {self.ratio}")
        if not 0.0 <= self.energy <= 1.0:
            raise ConfigError(f"energy must be in [0, 1] (0 = off), got {self.energy}")
        if self.rank < 0:
            raise ConfigError(f"rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.damp < 1.0:
            raise ConfigError(f"damp must be in [0, 1), got {self.damp}")
        super().validate()

    def wants(self, layer_idx: int, path: str) -> bool:
        return path in self.targets and not self.ignores(f"model.layers.{layer_idx}.{path}")


def choose_rank(cfg: FactorizeConfig, w: torch.Tensor, svals: torch.Tensor | None) -> int:
    """Rank for ``w [out, in]``; ``svals`` (descending) are needed only for the energy rule."""
    out_f, in_f = w.shape
    if cfg.rank:
        check_rank(cfg.rank, out_f, in_f)
        return cfg.rank
    if cfg.energy:
        assert svals is not None
        return rank_for_energy(svals, cfg.energy)
    return min(rank_for_ratio(out_f, in_f, cfg.ratio), min(out_f, in_f))


@torch.no_grad()
def factorize_module(layer: nn.Module, path: str, cfg: FactorizeConfig, gram: torch.Tensor | None) -> dict[str, Any]:
    """Replace ``layer.<path>`` by a LowRankLinear (or leave it when that would not save parameters).

    ``gram``: the input's Hessian ``[in, in]`` (:mod:`slimlm.calib.hessian`; any positive multiple of
    ``X X^T`` gives the same factors, the whitening's dampening being relative), None for plain SVD.
    """
    mod = layer.get_submodule(path)
    w = linear_weight(mod).detach().float()  # [out, in]
    out_f, in_f = w.shape
    svals = None
    if cfg.energy:
        svals = whitened_singular_values(w, whitening(gram, cfg.damp)) if gram is not None else torch.linalg.svdvals(w.double())
    r = choose_rank(cfg, w, svals)
    if r * (out_f + in_f) >= out_f * in_f and not cfg.rank:
        return {"rank": None, "params": out_f * in_f}
    if gram is not None:
        up, down = whitened_svd_factors(w, gram, r, cfg.damp)
    else:
        up, down = svd_factors(w, r)
    dtype = linear_weight(mod).dtype
    new = LowRankLinear.from_factors(up, down, getattr(mod, "bias", None), dtype=dtype)
    layer.set_submodule(path, new)
    return {"rank": r, "params": r * (out_f + in_f)}


class FactorizeAlgorithm:
    """Gram-matrix capture for the activation-aware variant on the layerwise driver."""

    name = "factorize"
    sequential = False

    def __init__(self, cfg: FactorizeConfig):
        self.cfg = cfg
        self.grams = HessianStore(torch.float64)  # SVD-LLM accumulates in float64
        self.report: dict[str, dict[str, Any]] = {}

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        return [[p] for p in self.cfg.targets if self.cfg.wants(layer_idx, p) and has_module(layer, p)]

    def begin_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self.grams.clear()

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        self.grams.add(path, x)

    def finish_group(self, layer_idx: int, layer: nn.Module, paths: list[str]) -> None:
        for p in paths:
            self.report[f"model.layers.{layer_idx}.{p}"] = factorize_module(layer, p, self.cfg, self.grams.pop(p))

    def end_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self.grams.clear()


def factorize_(model: Transformer, cfg: FactorizeConfig, samples: Sequence[torch.Tensor] | None = None,
               progress: bool = True, batch_size: int | None = None) -> TransformReport:
    """Factorize ``model`` in place; returns per-module ranks, parameter counts and timing."""
    before = model.num_parameters()
    algo = FactorizeAlgorithm(cfg)
    if cfg.rank:  # fail before any work: a fixed rank must fit every target
        for i, layer in enumerate(model.model.layers):
            for (p,) in algo.target_groups(i, layer):
                check_rank(cfg.rank, *linear_weight(layer.get_submodule(p)).shape)
    t0 = time.perf_counter()
    if cfg.activation_aware:
        if not samples:
            raise SlimlmError("activation-aware factorization needs calibration samples (give --calib FILE)")
        from slimlm.calib.driver import run_layerwise

        run_layerwise(model, samples, algo, batch_size=batch_size, progress=progress, desc="factorize: layers")
    else:
        layers: list[Any] = list(model.model.layers)
        for i, layer in enumerate(tqdm(layers, desc="factorize: layers", unit="layer", disable=not progress,
                                       dynamic_ncols=True)):
            for g in algo.target_groups(i, layer):
                algo.finish_group(i, layer, g)
    after = model.num_parameters()
    return TransformReport("factorize", time.perf_counter() - t0, algo.report,
                           {"parameters_before": before, "parameters_after": after, "ratio": after / before})


register_transform(FactorizeConfig, apply=factorize_, calibrated=lambda cfg: cfg.activation_aware)
