"""``prune_(model, PruneConfig, samples)``: magnitude, Wanda and SparseGPT on the shared driver.

Magnitude needs no data and walks the layers directly. Wanda and SparseGPT implement the
:class:`slimlm.calib.base.LayerwiseAlgorithm` protocol and are driven by
:func:`slimlm.calib.driver.run_layerwise` (like the reference code: every linear of a layer sees
that layer's inputs as produced by the already-pruned earlier layers, captured in one pass). The
maths lives in :mod:`slimlm.sparsity.masks` and :mod:`slimlm.sparsity.sparsegpt`; this file only
glues. With ``storage="sparse"`` each pruned linear becomes a :class:`SparseLinear`.

Example::

    from slimlm.sparsity import PruneConfig, prune_
    stats = prune_(lm.model, PruneConfig(method="wanda", sparsity=0.5), samples)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.calib.hessian import HessianStore
from slimlm.models.modules import linear_weight
from slimlm.sparsity.config import PruneConfig
from slimlm.sparsity.masks import (
    accumulate_row_scalars,
    magnitude_scores,
    make_row_scalars,
    select_mask,
    wanda_scores,
)
from slimlm.sparsity.sparsegpt import MinMaxQuantizer, sparsegpt_prune
from slimlm.sparsity.storage import SparseLinear
from slimlm.transforms import TransformReport, register_transform
from slimlm.transforms.select import DECODER_LINEARS, SHARED_INPUT_GROUPS, has_module
from slimlm.utils.errors import SlimlmError


def _targets(cfg: PruneConfig, layer_idx: int, n_layers: int, layer: nn.Module) -> list[list[str]]:
    groups = [[p for p in g if p in cfg.targets] for g in SHARED_INPUT_GROUPS]
    groups.append([p for p in cfg.targets if p not in DECODER_LINEARS])  # anything else named
    out = []
    for g in groups:
        g = [p for p in g if has_module(layer, p) and cfg.sparsity_for(layer_idx, n_layers, p) is not None]
        if g:
            out.append(g)
    return out


class PruneAlgorithm:
    """Wanda / SparseGPT glue for the layer-by-layer driver (magnitude also works, without stats)."""

    sequential = False

    def __init__(self, cfg: PruneConfig, n_layers: int):
        self.cfg, self.n_layers = cfg, n_layers
        self.name = f"prune-{cfg.method}"
        self.stats: dict[str, torch.Tensor] = {}  # Wanda's row scalars
        self.hessians = HessianStore()  # SparseGPT
        self.report: dict[str, dict[str, Any]] = {}
        self._idx = 0

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        return _targets(self.cfg, layer_idx, self.n_layers, layer)

    def begin_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self._idx = layer_idx
        self.stats.clear()
        self.hessians.clear()

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        # x: [tokens, in] float32
        if self.cfg.method == "wanda":
            if path not in self.stats:
                self.stats[path] = make_row_scalars(x.shape[1])
            accumulate_row_scalars(self.stats[path], x)
        elif self.cfg.method == "sparsegpt":
            self.hessians.add(path, x)

    def finish_group(self, layer_idx: int, layer: nn.Module, paths: list[str]) -> None:
        for p in paths:
            stat = self.hessians.pop(p) if self.cfg.method == "sparsegpt" else self.stats.pop(p, None)
            prune_module(layer, p, self.cfg, self.cfg.sparsity_for(layer_idx, self.n_layers, p) or 0.0,
                         stat, f"model.layers.{layer_idx}.{p}", self.report)

    def end_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self.stats.clear()
        self.hessians.clear()


@torch.no_grad()
def prune_module(layer: nn.Module, path: str, cfg: PruneConfig, sparsity: float, stat: torch.Tensor | None,
                 full_name: str, report: dict[str, dict[str, Any]]) -> None:
    """Prune ``layer.<path>`` in place (nn.Linear weight zeroed) or swap in a SparseLinear."""
    mod = layer.get_submodule(path)
    w = linear_weight(mod).detach()  # [out, in]
    nm = cfg.nm
    codes = None
    if cfg.method == "sparsegpt":
        if stat is None:
            raise SlimlmError(f"sparsegpt: no calibration inputs reached {full_name}")
        quant = MinMaxQuantizer(cfg.bits, cfg.group_size) if cfg.bits else None
        w_hat, keep = sparsegpt_prune(w, stat, sparsity, nm, cfg.blocksize, cfg.dampening, quant)
        if quant is not None:
            scales = torch.stack(quant.scales, 1)  # [out, groups]
            zeros = torch.stack(quant.zeros, 1)
            gs = cfg.group_size if 0 < cfg.group_size < w.shape[1] else w.shape[1]
            g = torch.arange(w.shape[1]) // gs
            q = torch.round(w_hat / scales[:, g] + zeros[:, g]).clamp(0, 2**cfg.bits - 1)
            codes = (q.to(torch.int32), scales, zeros, cfg.bits, gs)
    else:
        if cfg.method == "wanda":
            if stat is None:
                raise SlimlmError(f"wanda: no calibration inputs reached {full_name}")
            scores = wanda_scores(w, stat)
        else:
            scores = magnitude_scores(w)
        keep = select_mask(scores, sparsity, nm, cfg.mask_scope)
        w_hat = w.float() * keep
    report[full_name] = {"sparsity": 1.0 - float(keep.sum()) / keep.numel(), "target": sparsity, "numel": keep.numel()}
    bias = getattr(mod, "bias", None)
    if cfg.storage == "sparse":
        new = SparseLinear.from_dense(w_hat.to(w.dtype) if codes is None else w_hat, bias, nm, codes, cfg.exec)
        layer.set_submodule(path, new)
    elif isinstance(mod, nn.Linear):
        mod.weight.copy_(w_hat.to(mod.weight.dtype))
    else:
        raise SlimlmError(f"{full_name} is a {type(mod).__name__}; dense storage needs an nn.Linear")


def prune_(model: nn.Module, cfg: PruneConfig, samples: Sequence[torch.Tensor] | None = None,
           progress: bool = True, batch_size: int | None = None) -> TransformReport:
    """Prune ``model`` (a slimlm Transformer) in place; returns per-module sparsity and timing."""
    layers: nn.ModuleList = model.model.layers  # type: ignore[union-attr,assignment]
    algo = PruneAlgorithm(cfg, len(layers))
    t0 = time.perf_counter()
    if cfg.method == "magnitude":
        for i, layer in enumerate(tqdm(layers, desc="prune-magnitude: layers", unit="layer", disable=not progress,
                                       dynamic_ncols=True)):
            for g in algo.target_groups(i, layer):
                algo.finish_group(i, layer, g)
    else:
        if not samples:
            raise SlimlmError(f"{cfg.method} needs calibration samples (give --calib FILE)")
        from slimlm.calib.driver import run_layerwise

        run_layerwise(model, samples, algo, batch_size=batch_size, progress=progress)  # type: ignore[arg-type]
    n = sum(r["numel"] for r in algo.report.values())
    total = sum(r["sparsity"] * r["numel"] for r in algo.report.values()) / max(n, 1)
    return TransformReport(cfg.method, time.perf_counter() - t0, algo.report, {"mean_sparsity": total})


register_transform(PruneConfig, apply=prune_, calibrated=lambda cfg: cfg.method != "magnitude")
