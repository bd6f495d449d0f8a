"""Mixed-precision report: bits per weight actually stored, per module and in total.

Bits are counted from what a module really holds (its persistent tensors: packed codes, scales,
zeros, outlier columns; the bias is not counted as weight storage), divided by the number of
weights of the dense ``[out, in]`` matrix it stands for. Totals are given for the linears only
("without embeddings"; also over the swapped modules only) and for the whole model (embeddings, norms, biases included; a tied
``lm_head`` counted once). :class:`QuantReport` is the transforms' one report type
(:class:`slimlm.transforms.TransformReport`) with this accounting added: ``module_bits`` per linear,
``modules`` the same as dictionaries keyed by path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from slimlm.models.modules import SwappableLinear
from slimlm.transforms.report import TransformReport


@dataclass
class ModuleBits:
    path: str
    kind: str  # "dense" for an untouched nn.Linear, else the module kind / class name
    weights: int  # out * in
    bits: int  # stored bits (codes + scales + zeros + kept columns), bias excluded

    @property
    def bits_per_weight(self) -> float:
        return self.bits / max(self.weights, 1)


@dataclass
class QuantReport(TransformReport):
    module_bits: list[ModuleBits] = field(default_factory=list)
    total_params: int = 0  # dense-equivalent parameters of the whole model
    total_bits: int = 0  # stored bits of the whole model

    def add(self, m: ModuleBits) -> None:
        self.module_bits.append(m)
        self.modules[m.path] = {"kind": m.kind, "weights": m.weights, "bits": m.bits,
                                "bits_per_weight": m.bits_per_weight}

    @property
    def linear_bits_per_weight(self) -> float:
        return sum(m.bits for m in self.module_bits) / max(sum(m.weights for m in self.module_bits), 1)

    @property
    def quantized_bits_per_weight(self) -> float:
        """Over the modules that were swapped (dense linears left alone, e.g. lm_head, excluded)."""
        q = [m for m in self.module_bits if m.kind != "dense"]
        return sum(m.bits for m in q) / max(sum(m.weights for m in q), 1)

    @property
    def model_bits_per_weight(self) -> float:
        return self.total_bits / max(self.total_params, 1)

    def by_kind(self) -> dict[str, dict[str, float]]:
        out: dict[str, dict[str, float]] = {}
        for m in self.module_bits:
            d = out.setdefault(m.kind, {"modules": 0, "weights": 0, "bits": 0})
            d["modules"] += 1
            d["weights"] += m.weights
            d["bits"] += m.bits
        for d in out.values():
            d["bits_per_weight"] = d["bits"] / max(d["weights"], 1)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "seconds": self.seconds,
            "bits_per_weight_quantized": self.quantized_bits_per_weight,
            "bits_per_weight_linears": self.linear_bits_per_weight,
            "bits_per_weight_model": self.model_bits_per_weight,
            "total_params": self.total_params,
            "total_bytes": self.total_bits // 8,
            "by_kind": self.by_kind(),
            "modules": [{**asdict(m), "bits_per_weight": m.bits_per_weight} for m in self.module_bits],
            **self.metrics,
        }

    def summary(self) -> str:
        kinds = ", ".join(f"{k} x{int(v['modules'])} @ {v['bits_per_weight']:.3f} b/w" for k, v in self.by_kind().items())
        return (f"{self.method}: quantized linears {self.quantized_bits_per_weight:.3f} bits/weight, all linears "
                f"{self.linear_bits_per_weight:.3f}, whole model "
                f"{self.model_bits_per_weight:.3f} bits/weight ({self.total_bits / 8 / 2**20:.1f} MiB); {kinds}")


def _tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * t.element_size() * 8


def module_storage_bits(m: nn.Module) -> int:
    """Bits of the persistent tensors of a linear-like module, bias excluded."""
    bits = 0
    for name, t in m.state_dict().items():
        if name == "bias" or name.endswith(".bias"):
            continue
        bits += _tensor_bits(t)
    return bits


def _is_linear_like(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, SwappableLinear)) or hasattr(m, "in_features") and hasattr(m, "out_features")


def build_report(model: nn.Module, method: str = "") -> QuantReport:
    """Per-module stored bits of every linear-like module, and totals for the whole model."""
    rep = QuantReport(method=method)
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    seen: set[int] = set()
    for name, m in model.named_modules():
        if not name or isinstance(m, nn.Embedding) or not _is_linear_like(m):
            continue
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and id(w) in emb:
            continue  # tied lm_head: counted with the embeddings
        kind = "dense" if type(m) is nn.Linear else str(getattr(m, "kind", "") or type(m).__name__)
        weights = int(m.in_features) * int(m.out_features)  # type: ignore[arg-type]
        rep.add(ModuleBits(name, kind, weights, module_storage_bits(m)))
        if kind != "dense":  # count the dense-equivalent weights, not the packed element counts
            rep.total_params += weights
            rep.total_bits += rep.module_bits[-1].bits
            for n, t in list(m.named_parameters()) + list(m.named_buffers()):
                if n != "bias":
                    seen.add(id(t))
    for t in list(model.parameters()) + [b for _, b in _persistent_buffers(model)]:
        if id(t) not in seen:
            seen.add(id(t))
            rep.total_params += t.numel()
            rep.total_bits += _tensor_bits(t)
    return rep


def _persistent_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    sd_keys = set(model.state_dict().keys())
    return [(n, b) for n, b in model.named_buffers() if n in sd_keys]
