"""Each optimizer against an independent oracle: the authors' PyPI package where one exists (lion-pytorch,
came-pytorch, galore-torch), a straight-line reference written here from the paper's equations otherwise
(Adafactor), torch's SGD for LOMO. 8-bit AdamW has its own file (test_adamw8bit.py)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from slimlm.train.optim import build_optimizer
from slimlm.utils.errors import ConfigError, SlimlmError

STEPS = 8


def _params() -> list[torch.nn.Parameter]:
    """A tall matrix, a wide matrix and a vector: factored/projected paths on both sides plus a 1-D one."""
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in ((24, 10), (9, 20), (15,))]


def _grads(step: int, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g) * (1 + step) for p in params]


def _run_pair(ours: torch.optim.Optimizer, ref: torch.optim.Optimizer, a: list, b: list, steps: int = STEPS):
    for s in range(steps):
        for p, q, g in zip(a, b, _grads(s, a), strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()


def test_lion_equals_lion_pytorch():
    lion_pytorch = pytest.importorskip("lion_pytorch", reason="oracle lion-pytorch==0.2.5 (dev extras)")
    a, b = _params(), _params()
    ours = build_optimizer("lion", a, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    ref = lion_pytorch.Lion(b, lr=1e-2, betas=(0.9, 0.99), weight_decay=0.1)
    _run_pair(ours, ref, a, b)
    for p, q in zip(a, b, strict=True):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["exp_avg"], ref.state[q]["exp_avg"])


def test_came_equals_came_pytorch():
    came_pytorch = pytest.importorskip("came_pytorch", reason="oracle came-pytorch==0.1.3 (dev extras)")
    a, b = _params(), _params()
    kw = {"lr": 1e-2, "weight_decay": 0.01, "betas": (0.9, 0.999, 0.9999), "eps": (1e-30, 1e-16)}
    ours = build_optimizer("came", a, **kw)
    ref = came_pytorch.CAME(b, **kw)
    _run_pair(ours, ref, a, b)
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        keys = set(ref.state[q]) - {"step", "RMS"}
        assert keys == set(ours.state[p]) - {"step"}
        for k in keys:
            torch.testing.assert_close(ours.state[p][k], ref.state[q][k], rtol=1e-5, atol=1e-12)


def test_galore_equals_galore_torch_across_projector_refreshes():
    galore_torch = pytest.importorskip("galore_torch", reason="oracle galore-torch==1.0 (dev extras)")
    a, b = _params(), _params()
    hp = {"rank": 4, "update_proj_gap": 3, "scale": 0.25}
    ours = build_optimizer("galore", a, lr=1e-2, **hp)  # 1-D param: plain Adam, as galore's non-rank group
    ref = galore_torch.GaLoreAdamW([{"params": b[:2], **hp, "proj_type": "std"}, {"params": b[2:]}],
                                   lr=1e-2, no_deprecation_warning=True)
    _run_pair(ours, ref, a, b, steps=7)  # refreshes at t = 0, 3, 6
    for p, q in zip(a, b, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    tall, wide = a[0], a[1]
    assert ours.state[tall]["exp_avg"].shape == (24, 4) and ours.state[tall]["projector"].shape == (4, 10)
    assert ours.state[wide]["exp_avg"].shape == (4, 20) and ours.state[wide]["projector"].shape == (9, 4)
    torch.testing.assert_close(ours.state[tall]["projector"], ref.state[b[0]]["projector"].ortho_matrix)


def _adafactor_reference(params, grads_per_step, lr, eps2=1e-3, d=1.0, decay=-0.8, wd=0.0):
    """Adafactor from the paper's update (factored second moment, beta1 = 0, relative step size), straight
    from Shazeer & Stern 2018 Alg. 4/5 with torch's documented eps1 = machine epsilon (a floor, not added)."""
    eps1 = torch.finfo(torch.float32).eps
    theta = [p.detach().clone() for p in params]
    R = [torch.zeros(p.shape[0]) if p.dim() == 2 else None for p in params]
    C = [torch.zeros(p.shape[1]) if p.dim() == 2 else None for p in params]
    V = [torch.zeros(p.shape) if p.dim() != 2 else None for p in params]
    for t, grads in enumerate(grads_per_step, start=1):
        beta2 = 1 - t ** decay
        rho = min(lr, 1 / math.sqrt(t))
        for i, G in enumerate(grads):
            alpha = max(eps2, theta[i].square().mean().sqrt().item()) * rho
            theta[i] = theta[i] - lr * wd * theta[i]
            if G.dim() == 2:
                R[i] = beta2 * R[i] + (1 - beta2) * (G * G).sum(dim=1)  # (G ⊙ G) 1_m
                C[i] = beta2 * C[i] + (1 - beta2) * (G * G).sum(dim=0)  # 1_n^T (G ⊙ G)
                Vhat = torch.outer(R[i], C[i]) / max(R[i].sum().item(), eps1)
            else:
                V[i] = beta2 * V[i] + (1 - beta2) * G * G
                Vhat = V[i]
            U = G / torch.clamp(Vhat.sqrt(), min=eps1)
            U = U / max(1.0, U.square().mean().sqrt().item() / d)
            theta[i] = theta[i] - alpha * U
    return theta


def test_adafactor_is_the_factored_algorithm():
    a = _params()
    opt = build_optimizer("adafactor", a, lr=1e-2, weight_decay=0.01)
    assert isinstance(opt, torch.optim.Adafactor)
    grads = [_grads(s, a) for s in range(STEPS)]
    ref = _adafactor_reference(a, grads, lr=1e-2, wd=0.01)
    for gs in grads:
        for p, g in zip(a, gs, strict=True):
            p.grad = g.clone()
        opt.step()
    for p, r in zip(a, ref, strict=True):
        torch.testing.assert_close(p.detach(), r, rtol=1e-5, atol=1e-6)
    st = opt.state[a[0]]  # factored: a row and a column vector, no full second moment
    assert sum(v.numel() for v in st.values() if isinstance(v, torch.Tensor) and v.dim() > 0) == 24 + 10


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def test_lomo_step_equals_sgd_and_frees_grads_in_backward():
    model, ref = _mlp(), _mlp()
    opt = build_optimizer("lomo", model.parameters(), lr=0.05, weight_decay=0.1)
    assert opt.updates_in_backward
    opt.attach(model)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, weight_decay=0.1)
    x = torch.randn(5, 6)
    for _ in range(3):
        model(x).square().mean().backward()  # the update happens here
        assert all(p.grad is None for p in model.parameters())
        opt.step()
        sgd.zero_grad()
        ref(x).square().mean().backward()
        sgd.step()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            # SGD: p - lr*(g + wd*p); LOMO: p*(1 - lr*wd) - lr*g (same value, different rounding)
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_lomo_refuses_what_it_cannot_honour():
    model = _mlp()
    with pytest.raises(ConfigError, match="cannot accumulate"):
        build_optimizer("lomo", model.parameters(), lr=0.1, grad_accumulation=4)
    with pytest.raises(ConfigError, match="cannot clip"):
        build_optimizer("lomo", model.parameters(), lr=0.1, max_grad_norm=1.0)
    opt = build_optimizer("lomo", model.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match="attach"):
        opt.step()
    with pytest.raises(ConfigError, match="not in the attached model"):
        opt.attach(torch.nn.Linear(2, 2))
    opt.attach(model)
    with pytest.raises(ConfigError, match="already attached"):
        opt.attach(model)
    x = torch.randn(2, 6)
    model(x).sum().backward()
    with pytest.raises(SlimlmError, match="second gradient before step"):
        model(x).sum().backward()


def test_bad_hyperparameters_are_config_errors():
    for name, kw in (("lion", {"betas": (0.9, 1.5)}), ("came", {"lr": -1.0}), ("adamw8bit", {"weight_decay": -1}),
                     ("galore", {"rank": 0})):
        with pytest.raises(ConfigError):
            build_optimizer(name, copy.deepcopy(_params()), **kw)
