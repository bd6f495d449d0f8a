"""Low-rank maths: full rank reproduces the layer, whitening minimizes the output error, rank rules."""

from __future__ import annotations

import pytest
import torch

from slimlm.calib.hessian import accumulate_hessian, make_hessian
from slimlm.lowrank.gqa import merge_matrix
from slimlm.lowrank.linear import LowRankLinear
from slimlm.lowrank.svd import (
    rank_for_energy,
    rank_for_ratio,
    svd_factors,
    whitened_svd_factors,
)
from slimlm.utils.errors import ConfigError, SlimlmError


def _data(out_f: int = 24, in_f: int = 40, tokens: int = 300):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(tokens, in_f, generator=g) @ (torch.randn(in_f, in_f, generator=g) * 0.3 + torch.eye(in_f))
    x = x * torch.logspace(-1, 1, in_f)
    gram, _ = accumulate_hessian(make_hessian(in_f, torch.float64), 0, x)  # 2/n X^T X, the shared accumulator
    return w, x, gram


def test_full_rank_reproduces_the_layer() -> None:
    w, x, gram = _data()
    for up, down in (svd_factors(w, 24), whitened_svd_factors(w, gram, 24, damp=0.0)):
        assert torch.allclose(up @ down, w, atol=1e-4)
        mod = LowRankLinear.from_factors(up, down, torch.ones(24))
        assert torch.allclose(mod(x), x @ w.t() + 1, atol=1e-3 * float(x.abs().max()))
        assert torch.allclose(mod.dense_weight(), w, atol=1e-4)


@pytest.mark.parametrize("rank", [2, 8, 16])
def test_activation_aware_minimizes_output_error(rank: int) -> None:
    w, x, gram = _data()
    up, down = svd_factors(w, rank)
    aup, adown = whitened_svd_factors(w, gram, rank, damp=1e-6)
    err_plain = float((x @ (w - up @ down).t()).norm())
    err_aware = float((x @ (w - aup @ adown).t()).norm())
    assert err_aware < err_plain
    # oracle: x has full column rank, so the best rank-r x W'^T is the truncated SVD of x W^T (Eckart-Young
    # on the outputs): the smallest possible output error is the norm of its discarded singular values
    sv = torch.linalg.svdvals((x @ w.t()).double())
    assert err_aware == pytest.approx(float(sv[rank:].square().sum().sqrt()), rel=1e-3)
    # plain SVD is still the best in weight space (Eckart-Young)
    assert float((w - up @ down).norm()) <= float((w - aup @ adown).norm()) + 1e-4


def test_rank_rules() -> None:
    assert rank_for_ratio(576, 576, 0.8) == 230  # 0.8 * 576 * 576 / 1152
    assert rank_for_ratio(4, 4, 0.01) == 1
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 9 / 14) == 1 and rank_for_energy(s, 0.9) == 2 and rank_for_energy(s, 1.0) == 3
    with pytest.raises(ConfigError):
        rank_for_ratio(4, 4, 1.5)


@pytest.mark.parametrize("rank", [0, 25, 100])
def test_rank_out_of_range_is_an_error(rank: int) -> None:
    w, _, gram = _data()
    with pytest.raises(ConfigError):
        svd_factors(w, rank)
    with pytest.raises(ConfigError):
        whitened_svd_factors(w, gram, rank)


def test_merge_matrix() -> None:
    # 4 query heads reading 4 KV heads (MHA) -> 2 groups: heads {0,1} and {2,3} are averaged
    m = merge_matrix(4, 4, 2)
    assert torch.equal(m, torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]], dtype=torch.float64))
    # 6 query heads, 3 KV heads -> 2 groups: group 0 reads old heads 0 (2x) and 1 (1x)
    m = merge_matrix(6, 3, 2)
    assert torch.allclose(m[0], torch.tensor([2 / 3, 1 / 3, 0.0], dtype=torch.float64))
    assert torch.allclose(m.sum(1), torch.ones(2, dtype=torch.float64))
    with pytest.raises(SlimlmError):
        merge_matrix(6, 3, 4)
