"""The Chinchilla fit and its compute-optimal allocation, against an independent numeric minimisation
and the paper's published numbers. Run: ``.venv/bin/python -m pytest tests/plan/test_chinchilla.py``."""

from __future__ import annotations

import numpy as np
import pytest

from slimlm.plan.chinchilla import CHINCHILLA
from slimlm.utils.errors import SlimlmError

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


def loss(n, d):
    return E + A / n**ALPHA + B / d**BETA


@pytest.mark.parametrize("flops", [1e18, 5.76e23, 1e26])
def test_optimum_matches_a_numeric_minimisation(flops):
    # independent oracle: evaluate L(N, C/6N) on a fine log grid of N and take the minimum
    n = np.logspace(5, 14, 400_001)
    i = int(np.argmin(loss(n, flops / (6 * n))))
    n_opt, d_opt = CHINCHILLA.optimal(flops)
    assert n_opt == pytest.approx(n[i], rel=2e-4)
    assert d_opt == pytest.approx(flops / (6 * n[i]), rel=2e-4)
    assert 6 * n_opt * d_opt == pytest.approx(flops, rel=1e-12)
    assert CHINCHILLA.loss(n_opt, d_opt) <= loss(n[i], flops / (6 * n[i])) + 1e-12


def test_loss_of_a_given_model():
    # Chinchilla itself: 70B parameters on 1.4T tokens, by hand from the published coefficients
    assert CHINCHILLA.loss(70e9, 1.4e12) == pytest.approx(1.69 + 406.4 / 70e9**0.34 + 410.7 / 1.4e12**0.28, rel=1e-12)
    assert CHINCHILLA.loss(70e9, 1.4e12) == pytest.approx(1.94, abs=0.01)


def test_published_allocations():
    # Table 2 of Hoffmann et al. 2022, approach 3: N_opt ~ C^0.46, D_opt ~ C^0.54 (published to 2 digits)
    n1, d1 = CHINCHILLA.optimal(1e20)
    n2, d2 = CHINCHILLA.optimal(1e24)
    a = np.log(n2 / n1) / np.log(1e4)
    b = np.log(d2 / d1) / np.log(1e4)
    assert a == pytest.approx(0.46, abs=0.01) and b == pytest.approx(0.54, abs=0.01)
    # approach 3 puts Gopher's budget (5.76e23 FLOPs) at about 40B parameters. The rounded published
    # coefficients give ~32B (a gap noted by the replication of Besiroglu et al. 2024): tolerance 30%.
    n, d = CHINCHILLA.optimal(5.76e23)
    assert n == pytest.approx(40e9, rel=0.30)
    assert d == pytest.approx(5.76e23 / (6 * 40e9), rel=0.45)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_budget_must_be_positive(bad):
    with pytest.raises(SlimlmError, match="compute budget must be > 0"):
        CHINCHILLA.optimal(bad)
