"""AWQ (Lin et al., 2023): activation-aware per-input-channel scaling before weight quantization.

For a group of linears reading the same input ``x`` (q/k/v, gate/up, o_proj, down_proj), scale the
weight columns by ``s = mean|x|^alpha`` (normalized by ``sqrt(max(s) * min(s))``) and the input by
``1/s``: salient channels get a finer grid. ``alpha`` runs over a 20-point grid in [0, 1) and the
winner minimizes the groups' output error ``||x W^T - (x/s) Q(W s)^T||^2``. The error is computed
exactly over *all* calibration tokens through ``H = x^T x`` (``err = sum_o d_o H d_o^T`` with
``d = Q(W s)/s - W``), so no activations are stored. ``1/s`` is folded into the preceding norm
(``norm.fold_scale_``) or preceding linear (``v_proj -> o_proj`` when shapes match,
``up_proj -> down_proj``); a group without a foldable predecessor is only quantized.

Optional clipping search (``clip_search``): per output row and group, shrink the weight's absmax by
``1 - i/20`` (``i < 10``), keeping the ratio with the lowest per-group output error
``d_g H_gg d_g^T``. Quantization (RTN on the scaled, clipped weights) happens in ``end_layer``, after
every scale of the layer was folded.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from slimlm.calib.driver import run_layerwise
from slimlm.calib.hessian import HessianStore
from slimlm.quant.config import WeightQuantConfig
from slimlm.quant.methods.base import layer_groups, layer_prefix, register_method, weight_module
from slimlm.quant.methods.rtn import quantize_top_level
from slimlm.quant.primitives import quantize_weight, resolve_group_size
from slimlm.utils.errors import ConfigError


@dataclass
class AWQConfig(WeightQuantConfig):
    kind = "awq"
    n_grid: int = field(default=20, metadata={"min": 1, "help": "alpha grid points in [0, 1)"})
    clip_search: bool = field(default=True, metadata={"help": "search a clipping ratio per row and group"})
    clip_grid: int = field(default=20, metadata={"min": 1, "help": "clipping grid resolution (ratios 1 - i/clip_grid)"})
    max_shrink: float = field(default=0.5, metadata={"min": 0, "lt": 1, "help": "largest clipping shrink tried"})

    def validate(self) -> None:
        if self.n_grid < 1 or self.clip_grid < 1:
            raise ConfigError("awq: n_grid and clip_grid must be >= 1")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"awq: max_shrink must be in [0, 1), got {self.max_shrink}")
        super().validate()


# --- pure functions -----------------------------------------------------------------------------
def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """``sum_tokens ||x (w_hat - w)^T||^2`` from ``h = x^T x``: w, w_hat [out, in], h [in, in]."""
    d = w_hat - w
    return float(((d @ h) * d).sum())


def awq_scale_candidates(x_mean: torch.Tensor, n_grid: int) -> list[tuple[float, torch.Tensor]]:
    """``(alpha, s)`` for alpha = i / n_grid: ``s = clamp(x_mean^alpha, 1e-4)``, geometric-mean normalized."""
    out = []
    for i in range(n_grid):
        alpha = i / n_grid
        s = x_mean.float().pow(alpha).clamp(min=1e-4)
        out.append((alpha, s / (s.max() * s.min()).sqrt()))
    return out


def search_scale(
    weights: list[torch.Tensor], cfgs: list[WeightQuantConfig], x_mean: torch.Tensor, h: torch.Tensor, n_grid: int
) -> tuple[torch.Tensor, float, list[float]]:
    """Best per-channel scale for linears sharing input statistics ``x_mean: [in]``, ``h: [in, in]``.

    Returns ``(s [in], alpha, errors per alpha)``; alpha = 0 (s = 1) is plain RTN, so the result is
    never worse than RTN on the calibration objective.
    """
    best: tuple[float, float, torch.Tensor] | None = None
    errs = []
    for alpha, s in awq_scale_candidates(x_mean, n_grid):
        err = 0.0
        for w, c in zip(weights, cfgs, strict=True):
            w_hat = quantize_weight(w * s, c.bits, c.group_size, c.symmetric).dequantize() / s
            err += output_error(w, w_hat, h)
        errs.append(err)
        if best is None or err < best[0]:
            best = (err, alpha, s)
    assert best is not None
    return best[2], best[1], errs


def search_clip(w: torch.Tensor, h: torch.Tensor, cfg: WeightQuantConfig, grid: int, max_shrink: float) -> torch.Tensor:
    """Clip ``w: [out, in]`` per row and group to ``ratio * absmax`` minimizing ``d_g H_gg d_g^T``."""
    out, cols = w.shape
    g = resolve_group_size(cols, cfg.group_size)
    n = -(-cols // g)
    pad = n * g - cols  # a ragged last group is padded with zero weights and zero Hessian entries
    wg = torch.nn.functional.pad(w.float(), (0, pad)).reshape(out, n, g)  # [out, n, g]
    hp = torch.nn.functional.pad(h.float(), (0, pad, 0, pad))
    hg = torch.stack([hp[i * g : (i + 1) * g, i * g : (i + 1) * g] for i in range(n)])  # [n, g, g]
    absmax = wg.abs().amax(dim=2, keepdim=True)  # [out, n, 1]
    best_err = torch.full((out, n), float("inf"))
    best = wg.clone()
    for i in range(int(max_shrink * grid)):
        mx = absmax * (1 - i / grid)
        wc = torch.clamp(wg, -mx, mx)
        dq = quantize_weight(wc.reshape(out, n * g)[:, :cols], cfg.bits, cfg.group_size, cfg.symmetric).dequantize()
        d = torch.nn.functional.pad(dq, (0, pad)).reshape(out, n, g) - wg
        err = torch.einsum("ong,ngk,onk->on", d, hg, d)  # [out, n]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better.unsqueeze(2), wc, best)
    return best.reshape(out, n * g)[:, :cols]


# --- driver glue ----------------------------------------------------------------------------------
def preceding(layer: nn.Module, group: list[str]) -> nn.Module | None:
    """The module whose output feeds ``group`` and can absorb ``1/s`` (a norm or a linear), or None."""
    first = group[0]
    if first in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        prev = getattr(layer, "attn_norm", None)
    elif first in ("mlp.gate_proj", "mlp.up_proj"):
        prev = getattr(layer, "mlp_norm", None)
    elif first == "self_attn.o_proj":
        prev = _get(layer, "self_attn.v_proj")  # valid only without GQA: the shape check below
    elif first == "mlp.down_proj":
        prev = _get(layer, "mlp.up_proj") if getattr(layer.get_submodule("mlp"), "gated", False) else None
    else:
        prev = None
    if isinstance(prev, nn.Linear):
        target = layer.get_submodule(first)
        assert isinstance(target, nn.Linear)
        return prev if prev.out_features == target.in_features else None
    return prev if prev is not None and hasattr(prev, "fold_scale_") else None


def _get(layer: nn.Module, path: str) -> nn.Module | None:
    try:
        return layer.get_submodule(path)
    except AttributeError:
        return None


@torch.no_grad()
def fold_scale(prev: nn.Module, group: list[nn.Linear], s: torch.Tensor) -> None:
    """Divide ``prev``'s output by ``s`` and multiply the group's weight columns by ``s``."""
    if isinstance(prev, nn.Linear):
        prev.weight.div_(s.to(prev.weight.dtype).unsqueeze(1))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias.dtype))
    else:
        prev.fold_scale_(s)  # type: ignore[operator]
    for lin in group:
        lin.weight.mul_(s.to(lin.weight.dtype).unsqueeze(0))


class AWQAlgorithm:
    name = "awq"
    sequential = False

    def __init__(self, cfg: AWQConfig) -> None:
        self.cfg = cfg
        self.stats: dict[str, list] = {}  # type: ignore[type-arg]  # first path of a group -> [sum|x|, tokens]
        self.hessians = HessianStore()  # first path of a group -> H = 2/n sum x^T x
        self.first: dict[str, str] = {}
        self.pending: list[tuple[str, str]] = []  # (relative path, full path) quantized in end_layer
        self.hinv: dict[str, torch.Tensor] = {}
        self.alphas: dict[str, float] = {}

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        pre = layer_prefix(layer_idx)
        groups = [[p for p in grp if self.cfg.for_module(pre + p) is not None] for grp in layer_groups(layer)]
        return [grp for grp in groups if grp]

    def begin_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self.stats, self.first, self.pending = {}, {}, []
        self.hessians.clear()
        for grp in self.target_groups(layer_idx, layer):
            for p in grp:
                self.first[p] = grp[0]

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        # x: [tokens, in]; one set of statistics per group (its linears share the input)
        key = self.first[path]
        if key != path:
            return
        st = self.stats.setdefault(key, [torch.zeros(x.shape[1]), 0])
        st[0] += x.abs().sum(dim=0)
        st[1] += x.shape[0]
        self.hessians.add(key, x)

    def finish_group(self, layer_idx: int, layer: nn.Module, paths: list[str]) -> None:
        pre = layer_prefix(layer_idx)
        sum_abs, n = self.stats[paths[0]]
        h2 = self.hessians.pop(paths[0])
        assert h2 is not None
        h = h2 / 2  # mean x^T x over the tokens
        lins = [cast(nn.Linear, layer.get_submodule(p)) for p in paths]
        cfgs = [self.cfg.for_module(pre + p) for p in paths]
        for p, lin, c in zip(paths, lins, cfgs, strict=True):
            assert isinstance(lin, nn.Linear) and c is not None
            resolve_group_size(lin.in_features, c.group_size, pre + p)
        prev = preceding(layer, paths)
        if prev is not None:
            weights = [lin.weight.detach().float() for lin in lins]
            s, alpha, _ = search_scale(weights, cfgs, sum_abs / max(n, 1), h, self.cfg.n_grid)  # type: ignore[arg-type]
            fold_scale(prev, lins, s)
            self.alphas[pre + paths[0]] = alpha
            h = h / s.unsqueeze(0) / s.unsqueeze(1)  # statistics of the scaled input x / s
        for p, lin, c in zip(paths, lins, cfgs, strict=True):
            if self.cfg.clip_search and not p.endswith(("q_proj", "k_proj")):  # q/k: error is not in their output
                assert isinstance(lin, nn.Linear) and c is not None
                with torch.no_grad():
                    lin.weight.copy_(search_clip(lin.weight.detach().float(), h, c, self.cfg.clip_grid,
                                                 self.cfg.max_shrink).to(lin.weight.dtype))
            self.pending.append((p, pre + p))

    def end_layer(self, layer_idx: int, layer: nn.Module) -> None:
        for p, full in self.pending:
            lin = layer.get_submodule(p)
            c = self.cfg.for_module(full)
            assert isinstance(lin, nn.Linear) and c is not None
            qw = quantize_weight(lin.weight, c.bits, c.group_size, c.symmetric)
            layer.set_submodule(p, weight_module(lin, qw))
        self.pending, self.stats = [], {}


@register_method(AWQConfig, calibrated=True)
def _apply_awq(model: nn.Module, cfg: AWQConfig, samples: Sequence[torch.Tensor] | None, progress: bool) -> None:
    assert samples is not None
    run_layerwise(model, samples, AWQAlgorithm(cfg), progress=progress)  # type: ignore[arg-type]
    quantize_top_level(model, cfg)
