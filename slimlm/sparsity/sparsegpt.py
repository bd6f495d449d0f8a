"""SparseGPT as pure functions: make/accumulate the Hessian, then prune (and optionally quantize).

SparseGPT (Frantar & Alistarh, 2023) prunes a linear layer column by column, the OBS way: with
``H = 2 X X^T`` of the layer inputs and ``Hinv`` its inverse's upper Cholesky factor, removing
(or rounding) weight ``w_ic`` costs ``w_ic^2 / Hinv_cc^2`` and the error is compensated on the
not-yet-processed columns ``W[:, c:] -= err * Hinv[c, c:] / Hinv_cc``. The mask is chosen
adaptively per block of ``blocksize`` columns (lowest ``w^2 / Hinv_cc^2`` in the block, i.e. with
the weights already updated by the earlier blocks), or per group of ``M`` columns for N:M.

Joint pruning + quantization (the paper's section 3.4): each surviving weight is also rounded to
the grid of a :class:`ColumnQuantizer` (default :class:`MinMaxQuantizer`, built on
:mod:`slimlm.quant.primitives`) inside the same loop, so the rounding error is compensated
too. Grids always contain 0, so pruned weights stay exactly zero.

The Hessian comes from the shared accumulator :mod:`slimlm.calib.hessian` (``H = 2/n sum x x^T`` over
the calibration tokens, the reference's running mean; re-exported here).

Example::

    H, n = make_hessian(in_features), 0
    for x in inputs:                       # x: [tokens, in]
        H, n = accumulate_hessian(H, n, x)
    w_hat, mask = sparsegpt_prune(W, H, sparsity=0.5)
"""

from __future__ import annotations

from typing import Protocol

import torch

from slimlm.calib.hessian import accumulate_hessian, make_hessian
from slimlm.sparsity.masks import check_sparsity
from slimlm.utils.linalg import inverse_cholesky_upper

__all__ = ["ColumnQuantizer", "MinMaxQuantizer", "accumulate_hessian", "make_hessian", "sparsegpt_prune"]


class ColumnQuantizer(Protocol):
    """Rounds weights column by column inside the OBS loop.

    ``group_size`` columns share parameters (``-1`` = one group per row, ``0`` = one for the whole
    tensor: the quantization meaning of group sizes); ``find_params``
    sees the current (already error-updated, pruned-to-zero) weights of a group ``[out, g]``;
    ``quantize`` rounds one column ``[out]`` and returns the de-quantized values.
    """

    group_size: int

    def find_params(self, w: torch.Tensor) -> None: ...

    def quantize(self, col: torch.Tensor) -> torch.Tensor: ...


def _inverse_cholesky(h: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; damp = percdamp * mean(diag(H))."""
    h = h.clone()
    damp = percdamp * torch.mean(torch.diag(h))
    idx = torch.arange(h.shape[0])
    h[idx, idx] += damp
    for attempt in range(6):
        try:
            return inverse_cholesky_upper(h)
        except torch.linalg.LinAlgError:
            h[idx, idx] += damp * (10**attempt)  # numerically indefinite: dampen more
    return inverse_cholesky_upper(h)


@torch.no_grad()
def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float = 0.5,
                    pattern: tuple[int, int] | None = None, blocksize: int = 128, percdamp: float = 0.01,
                    quantizer: ColumnQuantizer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``w: [out, in]`` with Hessian ``h: [in, in]``; returns ``(w_hat float32, keep mask)``.

    Unstructured: exactly ``int(block_cols * out * sparsity)`` weights pruned in each block of
    ``blocksize`` columns. ``pattern=(n, m)``: ``n`` of every ``m`` consecutive columns kept per row
    (``blocksize`` must then be a multiple of ``m``).
    """
    check_sparsity(sparsity)
    W = w.detach().float().clone()  # [out, in]
    rows, cols = W.shape
    H = h.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if pattern is not None and blocksize % pattern[1]:
        blocksize = (blocksize // pattern[1] or 1) * pattern[1]
    Hinv = _inverse_cholesky(H, percdamp)  # [in, in] upper
    mask = torch.ones(rows, cols, dtype=torch.bool)
    gs = quantizer.group_size if quantizer is not None else 0
    if quantizer is not None and (gs <= 0 or gs >= cols):
        quantizer.find_params(W)  # per-row (or per-tensor) grid from the original weights (reference)
        gs = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)  # [count]
        if pattern is None:
            score = W1.pow(2) / d.pow(2).unsqueeze(0)  # [out, count]: OBS saliency
            k = int(score.numel() * sparsity)
            keep1 = torch.ones(score.numel(), dtype=torch.bool)
            if k:
                keep1[torch.topk(score.flatten(), k, largest=False).indices] = False
            keep1 = keep1.view(rows, count)
        else:
            keep1 = torch.ones(rows, count, dtype=torch.bool)
        for i in range(count):
            if pattern is not None and i % pattern[1] == 0:
                n, m = pattern
                sc = W1[:, i:i + m].pow(2) / d[i:i + m].pow(2).unsqueeze(0)  # [out, m]
                drop = torch.topk(sc, m - n, dim=1, largest=False).indices
                keep1[:, i:i + m] = True
                keep1[:, i:i + m].scatter_(1, drop, False)
            if quantizer is not None and gs and (i1 + i) % gs == 0:
                quantizer.find_params(W1[:, i:i + gs] * keep1[:, i:i + gs])
            col = W1[:, i]
            q = col * keep1[:, i]
            if quantizer is not None:
                q = quantizer.quantize(q) * keep1[:, i]
            Q1[:, i] = q
            err = (col - q) / d[i]  # [out]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = keep1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    mask &= ~dead.unsqueeze(0)
    return W, mask


class MinMaxQuantizer:
    """The :class:`ColumnQuantizer` on :mod:`slimlm.quant.primitives` (GPTQ/SparseGPT reference grid).

    Asymmetric min/max grids always contain 0 (pruned weights stay zero); symmetric grids have the
    fixed zero ``2^(b-1)``, which also represents 0 exactly. Per row (``group_size=-1``), per tensor
    (``0``: one range for the whole matrix, as quantization's per-tensor grid) or per group.
    Records the parameters of every group it fits (``scales``/``zeros``, in column order) so a
    storage module can keep the integer codes.
    """

    def __init__(self, bits: int = 4, group_size: int = 128, symmetric: bool = False):
        from slimlm.quant.primitives import check_bits

        check_bits(bits)
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.scale = torch.zeros(0)
        self.zero = torch.zeros(0)
        self.scales: list[torch.Tensor] = []
        self.zeros: list[torch.Tensor] = []

    def find_params(self, w: torch.Tensor) -> None:
        from slimlm.quant.primitives import qparams_from_range

        # w: [out, g] -> scale, zero: [out]
        lo, hi = w.min(1).values, w.max(1).values
        if self.group_size == 0:  # per tensor: the whole matrix's range on every row
            lo, hi = lo.min().expand_as(lo), hi.max().expand_as(hi)
        self.scale, self.zero = qparams_from_range(lo, hi, self.bits, self.symmetric)
        self.scales.append(self.scale.clone())
        self.zeros.append(self.zero.clone())

    def quantize(self, col: torch.Tensor) -> torch.Tensor:
        from slimlm.quant.primitives import fake_quantize

        return fake_quantize(col, self.scale, self.zero, self.bits)
