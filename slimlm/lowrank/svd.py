"""Low-rank maths as pure functions: plain and activation-aware (whitened) truncated SVD.

Plain SVD minimizes ``||W - W'||_F``. The activation-aware variant (SVD-LLM) minimizes the error
on the calibration inputs, ``||(W - W') X||_F``: with the Gram matrix ``G = X X^T = S S^T``
(Cholesky, dampened), ``||(W - W') X||_F = ||(W - W') S||_F``, so truncate the SVD of ``W S`` and
map back: ``W' = U_r Sigma_r V_r^T S^-1``. Both return factors ``up [out, r]``, ``down [r, in]``
with ``sqrt(Sigma)`` split between them. ``G`` comes from the shared accumulator
(:mod:`slimlm.calib.hessian`, ``2/n X X^T``): the dampening is relative to ``mean(diag G)``, so any
positive multiple of ``X X^T`` gives the same factors.
"""

from __future__ import annotations

import math

import torch

from slimlm.utils.errors import ConfigError


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest rank whose two factors hold at most ``ratio`` of the dense parameters."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"parameter ratio must be in (0, 1], got {ratio}")
    return max(1, int(math.floor(ratio * out_features * in_features / (out_features + in_features))))


def rank_for_energy(s: torch.Tensor, threshold: float) -> int:
    """Smallest rank keeping ``threshold`` of the squared singular values' sum. s: [k] descending."""
    if not 0.0 < threshold <= 1.0:
        raise ConfigError(f"energy threshold must be in (0, 1], got {threshold}")
    e = s.double().pow(2).cumsum(0)
    return int(torch.searchsorted(e, threshold * e[-1]).item()) + 1 if e[-1] > 0 else 1


def check_rank(rank: int, out_features: int, in_features: int) -> None:
    if not 1 <= rank <= min(out_features, in_features):
        raise ConfigError(f"rank {rank} is outside [1, min(out, in) = {min(out_features, in_features)}]")


def _split(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    rs = s[:r].sqrt()
    return u[:, :r] * rs.unsqueeze(0), rs.unsqueeze(1) * vh[:r]


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD of ``w [out, in]`` -> ``(up [out, r], down [r, in])`` float32."""
    check_rank(rank, *w.shape)
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    up, down = _split(u, s, vh, rank)
    return up.float(), down.float()


def whitening(g: torch.Tensor, damp: float = 0.01) -> torch.Tensor:
    """Lower Cholesky factor ``S`` of ``G + damp * mean(diag G) I`` (float64), ``G = S S^T``."""
    g = g.double().clone()
    idx = torch.arange(g.shape[0])
    base = float(g.diagonal().mean()) or 1.0
    g[idx, idx] += damp * base
    for attempt in range(6):
        lower, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            return lower
        g[idx, idx] += damp * base * 10**attempt
    raise ConfigError("calibration Gram matrix is not positive definite even after dampening")


def whitened_singular_values(w: torch.Tensor, s_chol: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.double() @ s_chol)


def whitened_svd_factors(w: torch.Tensor, g: torch.Tensor, rank: int, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware truncated SVD (minimizes ``||(W - up down) X||``); g: ``X X^T`` [in, in]."""
    check_rank(rank, *w.shape)
    s_chol = whitening(g, damp)  # [in, in] lower
    u, s, vh = torch.linalg.svd(w.double() @ s_chol, full_matrices=False)
    up, m = _split(u, s, vh, rank)  # m: [r, in] in the whitened basis
    down = torch.linalg.solve_triangular(s_chol, m, upper=False, left=False)  # m S^-1
    return up.float(), down.float()
