"""What every PEFT layer wrapper offers, so apply / save / load / merge stay method-agnostic."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from slimlm.models.modules import linear_weight
from slimlm.utils.errors import SlimlmError


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus trainable adapter tensors (subclasses: LoRA, IA3).

    Subclasses implement ``forward``, :meth:`adapter_tensors` (peft's key suffix -> tensor) and, for
    additive methods, :meth:`merged_weight` / :meth:`merged_bias` (what the layer stands for, folded).
    """

    base_layer: nn.Module
    in_features: int
    out_features: int
    merged: bool = False

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The folded weight ``[out, in]`` float32 given the base weight ``w``."""
        raise NotImplementedError

    def merged_bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        return b

    def base_weight(self) -> torch.Tensor:
        """The base's (de-quantized) weight ``[out, in]`` float32, detached."""
        return linear_weight(self.base_layer).detach().float()

    # --- in-place merge of plain bases (reversible) ---------------------------------------------
    def check_mergeable(self) -> None:
        if type(self.base_layer) is not nn.Linear:
            raise SlimlmError(f"merging an adapter in place into a {type(self.base_layer).__name__} base is not "
                              "supported (only plain linears): merge_and_unload re-quantizes it instead")

    def _save_unmerged(self) -> None:
        """Keep what :meth:`unmerge` needs (default: nothing, it inverts the fold)."""

    def _unfold(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the plain base in place; forward then runs the base alone."""
        if self.merged:
            return
        self.check_mergeable()
        base = self.base_layer
        assert isinstance(base, nn.Linear)
        self._save_unmerged()
        w = base.weight
        nb = self.merged_bias(None if base.bias is None else base.bias.float())
        w.copy_(self.merged_weight(w.float()).to(w.dtype))
        if base.bias is not None and nb is not None:
            base.bias.copy_(nb.to(base.bias.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (equal up to float rounding)."""
        if not self.merged:
            return
        base = self.base_layer
        assert isinstance(base, nn.Linear)
        w, b = self._unfold(base.weight.float(), None if base.bias is None else base.bias.float())
        base.weight.copy_(w.to(base.weight.dtype))
        if base.bias is not None and b is not None:
            base.bias.copy_(b.to(base.bias.dtype))
        self.merged = False


def install(model: nn.Module, wrapped: Mapping[str, AdapterLayer]) -> None:
    """Freeze the model, swap the wrappers in, make only the adapters trainable."""
    model.requires_grad_(False)
    for p, w in wrapped.items():
        model.set_submodule(p, w)
        for name, t in w.named_parameters():
            if not name.startswith("base_layer."):
                t.requires_grad_(True)


def attach(model: nn.Module, name: str, module: nn.Module) -> None:
    """Freeze the model and add a trainable model-level module (prompt / prefix encoders)."""
    model.requires_grad_(False)
    model.add_module(name, module)
    module.requires_grad_(True)


def adapter_modules(model: nn.Module) -> dict[str, AdapterLayer]:
    """Runtime path -> adapter wrapper, for every wrapped linear of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}
