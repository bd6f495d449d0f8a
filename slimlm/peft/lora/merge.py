"""Merging a LoRA update into its base: in place for plain linears; de-quantize -> add -> re-quantize
for weight-only quantized bases, with the error the re-quantization adds reported per module.

Re-quantization uses the base's own format and settings: round-to-nearest with the same bits, group
size and symmetry for int8 / int4 / intx (new scales fitted to the merged weight), NF4 with the same
block sizes and double quantization. Act-order (``g_idx``) bases, W8A8, LLM.int8(), sparse and
low-rank bases are refused by name (their re-compression needs the calibration that made them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from slimlm.models.modules import SwappableLinear
from slimlm.peft.base import AdapterLayer
from slimlm.utils.errors import SlimlmError

WEIGHT_ONLY_KINDS = ("int8_weight", "int4_weight", "intx_weight", "nf4")


@dataclass
class MergeReport:
    """Per merged module: ``||Q(W') - W'|| / ||W' - W||`` (0 for plain linears), W the base's
    de-quantized weight, W' the merged one (``W + dW``; DoRA rescales rows): how much of the
    adapter's update the re-quantization loses."""

    errors: dict[str, float] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def summary(self) -> str:
        n = len(self.errors)
        if not any(self.errors.values()):
            return f"merged {n} adapters into plain weights (exact up to float rounding)"
        return f"merged {n} adapters; re-quantization kept the update to within {self.max_error:.1%} (worst module)"


def check_mergeable(base: nn.Module) -> None:
    if type(base) is nn.Linear:
        return
    kind = getattr(base, "kind", "")
    if kind not in WEIGHT_ONLY_KINDS:
        raise SlimlmError(f"merging LoRA into a {type(base).__name__} base is not supported (only plain linears and "
                          f"weight-only {', '.join(WEIGHT_ONLY_KINDS)}); keep the adapter unmerged")
    if getattr(base, "g_idx", None) is not None:
        raise SlimlmError(f"merging LoRA into an act-order {type(base).__name__} base is not supported: "
                          "keep the adapter unmerged")


@torch.no_grad()
def requantize(base: SwappableLinear, w: torch.Tensor, bias: torch.Tensor | None) -> SwappableLinear:
    """A new module of ``base``'s kind and settings holding ``w: [out, in]`` (float32) and ``bias``."""
    from slimlm.quant.linear import NF4Linear
    from slimlm.quant.nf4 import quantize_nf4
    from slimlm.quant.primitives import quantize_weight

    if isinstance(base, NF4Linear):
        nw = quantize_nf4(w, base.block_size, base.double_quant, base.double_block_size)
        return NF4Linear.from_quantized(nw, bias=bias)
    qw = base.to_quantized()  # type: ignore[operator]
    inp = w.shape[1]
    new = quantize_weight(w, qw.bits, qw.group_size, qw.symmetric, ragged=inp % qw.group_size != 0)
    return type(base).from_quantized(new, bias=bias)  # type: ignore[attr-defined, no-any-return]


@torch.no_grad()
def merged_base(layer: AdapterLayer) -> tuple[nn.Module, float]:
    """(the base of ``layer`` holding the folded weight, relative error added). A plain base is
    updated in place; a quantized one is replaced by a re-quantized module."""
    base = layer.base_layer
    check_mergeable(base)
    if type(base) is nn.Linear:
        layer.merge()
        return base, 0.0
    assert isinstance(base, SwappableLinear)
    w = base.dense_weight()  # [out, in] float32
    target = layer.merged_weight(w)
    b = getattr(base, "bias", None)
    new = requantize(base, target, layer.merged_bias(None if b is None else b.float()))
    err = float((new.dense_weight() - target).norm() / (target - w).norm().clamp(min=1e-30))
    return new, err
