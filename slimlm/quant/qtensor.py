"""The hand-off between quantization *methods* (which choose integer codes) and *storage* modules.

A method (RTN, GPTQ, AWQ, ...) produces a :class:`QuantizedWeight`; a packed runtime module
(``slimlm.quant.linear``) is built from it, and the exporters (compressed-tensors, GPTQ, GGUF) read
it. Convention (GPTQ's): codes are unsigned, ``0 <= q < 2**bits``, and for input column ``i`` of
output row ``o``::

    w[o, i] = (q[o, i] - zero[o, g_idx[i]]) * scale[o, g_idx[i]]

Symmetric schemes use the fixed ``zero = 2**(bits-1)``. ``g_idx`` is ``i // group_size`` unless
act-order permuted the columns (GPTQ ``desc_act`` with static groups keeps it that way too).
Per-channel quantization is ``group_size = in_features`` (one group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor  # [out, in] uint8/int32 codes in [0, 2**bits)
    scale: torch.Tensor  # [out, n_groups] float32
    zero: torch.Tensor  # [out, n_groups] int32 (2**(bits-1) everywhere when symmetric)
    bits: int
    group_size: int  # columns per group; == in_features for per-channel
    symmetric: bool
    g_idx: torch.Tensor | None = None  # [in] int32 group of each input column; None = i // group_size

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.qweight.shape[0]), int(self.qweight.shape[1]))

    def group_index(self) -> torch.Tensor:
        """``g_idx`` or the default ``i // group_size``: [in] int64."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return torch.arange(self.shape[1]) // self.group_size

    def dequantize(self) -> torch.Tensor:
        """Reference dequantization: [out, in] float32."""
        g = self.group_index()
        return (self.qweight.float() - self.zero.float()[:, g]) * self.scale.float()[:, g]
