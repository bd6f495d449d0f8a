import pytest
import torch

from slimlm.train.optim import build_optimizer, optimizers, register_optimizer
from slimlm.utils.errors import ConfigError


def test_adamw_by_name_steps_like_torch():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(4, 3))
    b = torch.nn.Parameter(a.detach().clone())
    ours = build_optimizer("adamw", [a], lr=0.1, weight_decay=0.01)
    ref = torch.optim.AdamW([b], lr=0.1, weight_decay=0.01)
    for _ in range(3):
        for p, o in ((a, ours), (b, ref)):
            o.zero_grad()
            (p.square().sum()).backward()
            o.step()
    assert torch.equal(a, b)


def test_unknown_and_duplicate_names_are_refused():
    with pytest.raises(ConfigError, match="unknown optimizer 'nope'"):
        build_optimizer("nope", [])
    with pytest.raises(ConfigError, match="registered twice"):
        register_optimizer("adamw")(lambda params, **kw: torch.optim.SGD(params, lr=1.0))
    assert "adamw" in optimizers()
