"""MHA -> GQA/MQA conversion: merge key/value heads into fewer KV groups.

Query head ``h`` of ``H`` reads old KV head ``h // (H / K_old)``. For ``K_new`` groups (``K_new``
must divide ``H``), new KV head ``j`` serves query heads ``[j H/K_new, (j+1) H/K_new)`` and its
``k_proj``/``v_proj`` rows are the mean of the old KV heads those query heads read (so an old head
read by more of them weighs more). ``weighting="activation"`` additionally weighs each old head by
the energy of its output on calibration data (``tr(W_h G W_h^T)``, ``G = X X^T`` of the layer's
``k_proj`` input, shared by ``v_proj``). The KV cache shrinks by ``K_old / K_new``. RoPE commutes
with the merge (both are linear in the projection rows).

Example::

    convert_gqa_(lm.model, GQAConfig(kv_heads=1))          # MQA
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from slimlm.calib.hessian import HessianStore
from slimlm.models.transformer import Transformer
from slimlm.transforms import TransformConfig, TransformReport, register_transform
from slimlm.utils.errors import ConfigError, SlimlmError


@dataclass
class GQAConfig(TransformConfig):
    kind: ClassVar[str] = "convert-gqa"
    family: ClassVar[str] = "convert-gqa"
    kv_heads: int = field(default=1, metadata={"min": 1, "help": "number of KV heads (groups) after conversion; must divide the query heads"})
    weighting: Literal["uniform", "activation"] = field(
        default="uniform", metadata={"help": "mean-pool uniformly or weighted by calibration output energy"})

    def validate(self) -> None:
        if self.kv_heads < 1:
            raise ConfigError(f"kv_heads must be >= 1, got {self.kv_heads}")


def merge_matrix(num_heads: int, old_kv: int, new_kv: int, head_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``[new_kv, old_kv]`` row-stochastic pooling weights (see module docstring)."""
    if num_heads % new_kv:
        raise SlimlmError(f"{new_kv} KV groups do not divide the {num_heads} query heads")
    per_new, per_old = num_heads // new_kv, num_heads // old_kv
    m = torch.zeros(new_kv, old_kv, dtype=torch.float64)
    for h in range(num_heads):
        m[h // per_new, h // per_old] += 1.0
    if head_weight is not None:
        m = m * head_weight.double().unsqueeze(0)
    return m / m.sum(1, keepdim=True)


def _merge_rows(w: torch.Tensor, m: torch.Tensor, head_dim: int) -> torch.Tensor:
    """w: [old_kv*Dh, ...] -> [new_kv*Dh, ...] with pooling weights m [new_kv, old_kv]."""
    old = w.double().reshape(m.shape[1], head_dim, -1)  # [old_kv, Dh, in]
    return torch.einsum("no,odi->ndi", m, old).reshape(m.shape[0] * head_dim, *w.shape[1:])


class _GramCapture:
    name = "gqa-gram"
    sequential = False

    def __init__(self) -> None:
        self.store = HessianStore(torch.float64)  # one per layer: k_proj's input, shared by v_proj
        self._idx = 0

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        return [["self_attn.k_proj"]]

    def begin_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self._idx = layer_idx

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        self.store.add(str(self._idx), x)

    def finish_group(self, layer_idx: int, layer: nn.Module, paths: list[str]) -> None:
        pass

    def end_layer(self, layer_idx: int, layer: nn.Module) -> None:
        pass


def _head_energy(w: torch.Tensor, g: torch.Tensor, kv: int, dh: int) -> torch.Tensor:
    wh = w.double().reshape(kv, dh, -1)  # [kv, Dh, in]
    return torch.einsum("kdi,ij,kdj->k", wh, g, wh).clamp(min=1e-12)


@torch.no_grad()
def convert_gqa_(model: Transformer, cfg: GQAConfig, samples: Sequence[torch.Tensor] | None = None,
                 progress: bool = True) -> TransformReport:
    """Merge KV heads in place and update ``model.config.num_key_value_heads``."""
    mc = model.config
    h, old_kv, dh = mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim
    if h % cfg.kv_heads:
        raise SlimlmError(f"--kv-heads {cfg.kv_heads} does not divide the {h} attention heads")
    if cfg.kv_heads > h:
        raise SlimlmError(f"--kv-heads {cfg.kv_heads} exceeds the {h} attention heads")
    t0 = time.perf_counter()
    grams: dict[int, torch.Tensor] = {}
    if cfg.weighting == "activation":
        if not samples:
            raise SlimlmError("activation-weighted GQA conversion needs calibration samples (give --calib FILE)")
        from slimlm.calib.driver import run_layerwise

        cap = _GramCapture()
        run_layerwise(model, samples, cap, progress=progress, desc="convert-gqa: layers")
        grams = {int(k): h for k, (h, _) in cap.store.items.items()}
    layers: list[Any] = list(model.model.layers)
    for i, layer in enumerate(layers):
        attn = layer.self_attn
        for name in ("k_proj", "v_proj"):
            mod = getattr(attn, name)
            if not isinstance(mod, nn.Linear):
                raise SlimlmError(f"GQA conversion needs dense k/v projections, layer {i} {name} is {type(mod).__name__}")
            weight = _head_energy(mod.weight, grams[i], old_kv, dh) if i in grams else None
            m = merge_matrix(h, old_kv, cfg.kv_heads, weight)
            new = nn.Linear(mod.in_features, cfg.kv_heads * dh, bias=mod.bias is not None, dtype=mod.weight.dtype)
            new.weight.copy_(_merge_rows(mod.weight, m, dh))
            if mod.bias is not None and new.bias is not None:
                new.bias.copy_(_merge_rows(mod.bias.unsqueeze(1), m, dh).squeeze(1))
            new.requires_grad_(False)
            setattr(attn, name, new)
        attn.num_kv_heads = cfg.kv_heads
    mc.num_key_value_heads = cfg.kv_heads
    return TransformReport("convert-gqa", time.perf_counter() - t0, metrics={
        "kv_heads_before": old_kv, "kv_heads_after": cfg.kv_heads, "kv_cache_ratio": cfg.kv_heads / old_kv,
        "parameters": model.num_parameters()})


register_transform(GQAConfig, apply=convert_gqa_, calibrated=lambda cfg: cfg.weighting == "activation")
