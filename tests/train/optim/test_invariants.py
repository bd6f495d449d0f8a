"""Invariants over every registered optimizer: a tiny regression problem's loss decreases, and
``state_dict`` → ``torch.save`` → ``torch.load(weights_only=True)`` → ``load_state_dict`` → continue equals
the uninterrupted run bit for bit (fp32 and bf16 parameters: state dtypes must survive the round trip)."""

from __future__ import annotations

import io

import pytest
import torch

from slimlm.train.optim import build_optimizer, optimizers

# small enough for the tiny MLP to exercise every path: 8-bit states, projected matrices, refreshes
KWARGS = {
    "adamw": {"lr": 1e-2},
    "adafactor": {"lr": 1e-2},
    "lion": {"lr": 1e-3, "weight_decay": 0.1},
    "came": {"lr": 1e-2, "weight_decay": 0.01},
    "adamw8bit": {"lr": 1e-2, "min_8bit_size": 16},
    "galore": {"lr": 1e-2, "rank": 2, "update_proj_gap": 2, "scale": 1.0},
    "lomo": {"lr": 5e-2},
}


def test_every_registered_optimizer_is_covered():
    assert set(optimizers()) == set(KWARGS)


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).to(dtype)


def _data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    return x.to(dtype), torch.sin(x[:, :4] * 2).to(dtype)


def _make(name: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    opt = build_optimizer(name, model.parameters(), **KWARGS[name])
    if getattr(opt, "updates_in_backward", False):
        opt.attach(model)  # type: ignore[attr-defined]
    return opt


def _train(model, opt, steps: int, dtype) -> list[float]:
    x, y = _data(dtype)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - y).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_loss_decreases(name):
    model = _model(torch.float32)
    losses = _train(model, _make(name, model), 40, torch.float32)
    assert losses[-1] < 0.8 * losses[0], losses[::8]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(KWARGS))
def test_resume_is_bit_exact(name, dtype):
    ref = _model(dtype)
    _train(ref, _make(name, ref), 6, dtype)

    model = _model(dtype)
    opt = _make(name, model)
    _train(model, opt, 3, dtype)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    saved_dtypes = {k: v.dtype for st in opt.state_dict()["state"].values() for k, v in st.items()
                    if isinstance(v, torch.Tensor)}
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = _model(dtype)
    resumed.load_state_dict(ckpt["model"])
    opt2 = _make(name, resumed)
    opt2.load_state_dict(ckpt["opt"])
    loaded_dtypes = {k: v.dtype for st in opt2.state.values() for k, v in st.items() if isinstance(v, torch.Tensor)}
    assert loaded_dtypes == saved_dtypes
    _train(resumed, opt2, 3, dtype)
    for p, q in zip(resumed.parameters(), ref.parameters(), strict=True):
        assert torch.equal(p, q)
