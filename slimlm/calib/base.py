"""The protocol every calibrated compression algorithm implements for the layer-by-layer driver.

The driver (:func:`slimlm.calib.driver.run_layerwise`) owns the streaming: it embeds the calibration
samples once, then for each decoder layer in turn it

1. calls ``algorithm.begin_layer(idx, layer)``;
2. for each group of ``algorithm.target_groups(idx, layer)`` (linear paths relative to the layer,
   e.g. ``["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]``): runs every sample
   through the layer with forward hooks that call ``algorithm.accumulate(path, module, x)`` with the
   module's input ``x: [tokens, in_features]`` (fp32), then calls
   ``algorithm.finish_group(idx, layer, paths)``, which compresses (and may replace, via
   ``layer.set_submodule``) those modules. With ``sequential=True`` each group is captured after
   the previous groups were compressed (GPTQ's true-sequential); with ``sequential=False`` all
   groups are captured in one pass from the uncompressed layer (the reference implementations);
3. calls ``algorithm.end_layer(idx, layer)`` and runs the samples through the compressed layer to
   produce the next layer's inputs.

A capture forward stops as soon as every target module of the pass was fed; an algorithm that hooks
more of the layer (e.g. its output) sets ``needs_full_forward = True`` (optional attribute).

So peak memory is one layer's hidden states for the calibration set plus what the algorithm keeps
(e.g. one Hessian per linear). Algorithms keep their math in pure functions and only glue here.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class LayerwiseAlgorithm(Protocol):
    name: str
    sequential: bool

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        """Ordered groups of linear paths inside ``layer`` to compress; [] skips the layer."""
        ...

    def begin_layer(self, layer_idx: int, layer: nn.Module) -> None: ...

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        """Consume one sample's input to ``module``: ``x: [tokens, in_features]`` float32."""
        ...

    def finish_group(self, layer_idx: int, layer: nn.Module, paths: list[str]) -> None:
        """Compress the modules at ``paths`` (replace them with ``layer.set_submodule`` if needed)."""
        ...

    def end_layer(self, layer_idx: int, layer: nn.Module) -> None: ...
