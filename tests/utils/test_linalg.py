"""inverse_cholesky_upper against the reference route (cholesky -> cholesky_inverse -> cholesky) in fp64."""

import pytest
import torch

from slimlm.utils.linalg import inverse_cholesky_upper


def _spd(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=gen) * (torch.rand(n, generator=gen) * 4)  # uneven column scales
    h = x.t() @ x / n
    h.diagonal().add_(0.01 * h.diagonal().mean())
    return h


@pytest.mark.parametrize("n", [1, 7, 96, 300])
def test_matches_the_reference_route_in_fp64(n: int) -> None:
    h = _spd(n, seed=n)
    u = inverse_cholesky_upper(h)
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h.double())), upper=True)
    assert (u.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.allclose(u.double().t() @ u.double() @ h.double(), torch.eye(n, dtype=torch.float64), atol=1e-4)


def test_not_positive_definite_raises() -> None:
    h = torch.eye(4)
    h[2, 2] = -1.0
    with pytest.raises(torch.linalg.LinAlgError):
        inverse_cholesky_upper(h)
