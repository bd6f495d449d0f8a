"""Distillation losses against torch's own definitions (independent oracles).

- forward / reverse KL with temperature: ``T^2 * F.kl_div`` of the log-softmaxes (values and gradients);
- cosine: ``F.cosine_embedding_loss`` with target 1; MSE: ``F.mse_loss``;
- the config's ranges and round trip.

Run: ``.venv/bin/python -m pytest tests/distill/test_losses.py``
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm.distill.config import DistillConfig
from slimlm.distill.losses import hidden_per_token, kd_per_token, mix
from slimlm.utils.config import BaseConfig
from slimlm.utils.errors import ConfigError


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("kind", ["fwd_kl", "rev_kl"])
def test_kd_equals_kl_div(kind: str, temperature: float) -> None:
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(7, 50, generator=g) * 3).requires_grad_(True)
    t = torch.randn(7, 50, generator=g) * 3
    ours = kd_per_token(s, t, temperature, kind)
    ours.sum().backward()
    g_ours = s.grad.clone()  # type: ignore[union-attr]
    s.grad = None
    ls, lt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    # kl_div(input, target) = sum target * (log target - input): input is the log of the "other" distribution
    ref = (F.kl_div(ls, lt, log_target=True, reduction="none") if kind == "fwd_kl"
           else F.kl_div(lt, ls, log_target=True, reduction="none")).sum(-1) * temperature**2
    ref.sum().backward()
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, s.grad, rtol=1e-5, atol=1e-7)
    assert (ours >= -1e-6).all()


def test_kd_is_zero_for_equal_logits_and_asymmetric() -> None:
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 20, generator=g), torch.randn(5, 20, generator=g)
    assert kd_per_token(s, s.clone(), 2.0).abs().max() < 1e-6
    assert not torch.allclose(kd_per_token(s, t, 1.0, "fwd_kl"), kd_per_token(s, t, 1.0, "rev_kl"))
    with pytest.raises(ValueError, match="shape"):
        kd_per_token(s, t[:, :10])


def test_hidden_losses_equal_torch() -> None:
    g = torch.Generator().manual_seed(2)
    hs, ht = torch.randn(6, 16, generator=g), torch.randn(6, 16, generator=g)
    cos_ref = F.cosine_embedding_loss(hs, ht, torch.ones(6), reduction="none")
    torch.testing.assert_close(hidden_per_token(hs, ht, "cosine"), cos_ref, rtol=1e-5, atol=1e-6)
    mse_ref = F.mse_loss(hs, ht, reduction="none").mean(-1)
    torch.testing.assert_close(hidden_per_token(hs, ht, "mse"), mse_ref)
    assert float(hidden_per_token(hs, 3 * hs, "cosine").abs().max()) < 1e-6  # scale-free


def test_mix_weights() -> None:
    ce, kd, h = torch.tensor(2.0), torch.tensor(10.0), torch.tensor(4.0)
    assert float(mix(ce, kd, 0.0)) == 2.0
    assert float(mix(ce, kd, 1.0)) == 10.0
    assert float(mix(ce, kd, 0.25, h, 0.5)) == pytest.approx(0.75 * 2 + 0.25 * 10 + 0.5 * 4)


def test_config_ranges_and_round_trip() -> None:
    cfg = DistillConfig(layers=4, kd_loss="rev_kl", temperature=3.0, alpha=0.9, hidden_loss="cosine")
    assert BaseConfig.load_any(cfg.to_dict()) == cfg
    for bad in ({"alpha": 1.5}, {"temperature": 0.0}, {"layers": -1}, {"student": " "}):
        with pytest.raises(ConfigError):
            DistillConfig(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="kd_loss"):
        DistillConfig.from_dict({"kd_loss": "js"})
