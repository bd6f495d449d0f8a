"""Pure mask functions for unstructured and N:M pruning (no model, no hooks: tensors in, masks out).

Convention: a mask is a bool tensor shaped like the weight ``[out, in]`` with ``True`` = *keep*.
Scores are "importance" (higher = keep). Every selector prunes an exact count so tests can check
the requested sparsity to the element:

* per output row (Wanda's comparison group): ``int(in * sparsity)`` weights pruned in every row;
* per layer (magnitude's default): ``int(out * in * sparsity)`` weights pruned in the matrix;
* N:M: in every run of ``M`` consecutive input columns of a row exactly ``N`` are kept.

Wanda's row scalars (``make_row_scalars`` / ``accumulate_row_scalars``) are the squared L2 norm of
each input channel over all calibration tokens; the score is ``|W| * ||X_j||_2``.
"""

from __future__ import annotations

import torch

from slimlm.utils.errors import ConfigError


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """``"2:4"`` -> (2, 4); ``None``/``""`` -> None (unstructured). Raises ConfigError on N >= M."""
    if not pattern:
        return None
    try:
        n_s, m_s = pattern.split(":")
        n, m = int(n_s), int(m_s)
    except ValueError:
        raise ConfigError(f"N:M pattern must look like '2:4', got {pattern!r}") from None
    if not (0 < n < m):
        raise ConfigError(f"N:M pattern {pattern!r} needs 0 < N < M (keep N of every M weights)")
    if m > 256:
        raise ConfigError(f"N:M pattern {pattern!r}: M must be at most 256")
    return n, m


def check_sparsity(sparsity: float) -> float:
    if not (0.0 <= float(sparsity) < 1.0):
        raise ConfigError(f"sparsity must be in [0, 1), got {sparsity}")
    return float(sparsity)


# --- scores -------------------------------------------------------------------------------------
def magnitude_scores(w: torch.Tensor) -> torch.Tensor:
    """|W|: [out, in] float32."""
    return w.detach().float().abs()


def make_row_scalars(in_features: int) -> torch.Tensor:
    """Empty Wanda statistic: sum over tokens of x_j^2, [in] float64 (exact over long streams)."""
    return torch.zeros(in_features, dtype=torch.float64)


def accumulate_row_scalars(acc: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Add one batch of inputs ``x: [tokens, in]`` to ``acc: [in]`` in place; returns ``acc``."""
    acc += x.double().pow(2).sum(0)
    return acc


def wanda_scores(w: torch.Tensor, row_scalars: torch.Tensor) -> torch.Tensor:
    """|W_ij| * ||X_j||_2: [out, in] float32."""
    return w.detach().float().abs() * row_scalars.float().sqrt().unsqueeze(0)


# --- selectors ----------------------------------------------------------------------------------
def mask_per_row(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(in * sparsity)`` lowest-scoring weights of every output row."""
    out_f, in_f = scores.shape
    k = int(in_f * check_sparsity(sparsity))
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k:
        idx = torch.topk(scores, k, dim=1, largest=False).indices  # [out, k]
        mask.scatter_(1, idx, False)
    return mask


def mask_per_layer(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the ``int(numel * sparsity)`` lowest-scoring weights of the whole matrix."""
    k = int(scores.numel() * check_sparsity(sparsity))
    mask = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        idx = torch.topk(scores.flatten(), k, largest=False).indices
        mask[idx] = False
    return mask.view_as(scores)


def mask_n_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive input columns of a row."""
    out_f, in_f = scores.shape
    if in_f % m:
        raise ConfigError(f"N:M pattern {n}:{m} needs in_features divisible by {m}, got {in_f}")
    g = scores.reshape(out_f, in_f // m, m)  # [out, groups, m]
    keep = torch.topk(g, n, dim=2).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(2, keep, True)
    return mask.reshape(out_f, in_f)


def select_mask(scores: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None, scope: str) -> torch.Tensor:
    """Dispatch: N:M when ``pattern`` is given, else per ``scope`` ("row" | "layer")."""
    if pattern is not None:
        return mask_n_m(scores, *pattern)
    if scope == "row":
        return mask_per_row(scores, sparsity)
    if scope == "layer":
        return mask_per_layer(scores, sparsity)
    raise ConfigError(f"unknown mask scope {scope!r}; use 'row' or 'layer'")


# --- checks -------------------------------------------------------------------------------------
def follows_n_m(w: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of ``m`` consecutive input weights of each row has at most ``n`` nonzeros."""
    out_f, in_f = w.shape
    if in_f % m:
        return False
    nz = (w.reshape(out_f, in_f // m, m) != 0).sum(-1)
    return bool((nz <= n).all())
