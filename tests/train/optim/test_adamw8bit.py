"""8-bit AdamW: the storage format against bitsandbytes (code tables) and brute force (nearest code),
the trajectory against bitsandbytes' AdamW8bit and torch's fp32 AdamW, and the state bytes."""

from __future__ import annotations

import pytest
import torch

from slimlm.train.optim import build_optimizer
from slimlm.train.optim.blockwise import dequantize_blockwise, dynamic_code, quantize_blockwise


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm()).item()


def test_code_tables_are_bitsandbytes_dynamic_types():
    bnb_f = pytest.importorskip("bitsandbytes.functional", reason="oracle bitsandbytes==0.50.2 (dev extras)")
    assert torch.equal(dynamic_code(True), bnb_f.create_dynamic_map(signed=True))
    assert torch.equal(dynamic_code(False), bnb_f.create_dynamic_map(signed=False))


@pytest.mark.parametrize("signed", [True, False])
def test_blocks_of_256_absmax_and_nearest_code(signed):
    torch.manual_seed(0)
    x = torch.randn(1000) * torch.logspace(-4, 0, 1000)  # several decades, ragged last block
    if not signed:
        x = x.square()
    codes, absmax = quantize_blockwise(x, signed)
    assert codes.dtype == torch.uint8 and codes.shape == (1000,)
    assert absmax.dtype == torch.float32 and absmax.shape == (4,)
    blocks = [x[i:i + 256] for i in range(0, 1000, 256)]
    torch.testing.assert_close(absmax, torch.stack([b.abs().max() for b in blocks]), rtol=0, atol=0)
    # brute force: the entry of the table minimising |table * absmax - x|, per value
    table = dynamic_code(signed)
    scale = torch.cat([torch.full((b.numel(),), b.abs().max().item()) for b in blocks])
    err = (table[None, :] * scale[:, None] - x[:, None]).abs()  # (1000, 256)
    best = err.min(dim=1).values
    ours = (dequantize_blockwise(codes, absmax, signed) - x).abs()
    assert torch.all(ours <= best * (1 + 1e-6) + 1e-12)


@pytest.fixture(scope="module")
def trajectories():
    """ours, bitsandbytes AdamW8bit and torch AdamW on the same gradient stream."""
    steps, shape = 20, (32, 160)
    bnb = pytest.importorskip("bitsandbytes", reason="oracle bitsandbytes==0.50.2 (dev extras)")
    torch.manual_seed(0)
    start = torch.randn(shape)
    a, b, c = (torch.nn.Parameter(start.clone()) for _ in range(3))
    kw = {"lr": 1e-2, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.01}
    ours = build_optimizer("adamw8bit", [a], **kw)
    ref8 = bnb.optim.AdamW8bit([b], **kw, min_8bit_size=4096)
    ref32 = torch.optim.AdamW([c], **kw)
    for s in range(steps):
        g = torch.randn(shape) * (1 + s) + 0.5
        for p, opt in ((a, ours), (b, ref8), (c, ref32)):
            p.grad = g.clone()
            opt.step()
    return start, (a, ours), (b, ref8), (c, ref32)


def test_states_are_uint8_and_track_fp32_adamw(trajectories):
    _, (a, ours), _, (c, ref32) = trajectories
    st = ours.state[a]
    assert st["exp_avg_codes"].dtype == st["exp_avg_sq_codes"].dtype == torch.uint8
    m, v = ours.moments(st)
    # stated tolerance: the de-quantized moments within 5% (relative L2) of fp32 AdamW's on the same grads
    assert _rel(m, ref32.state[c]["exp_avg"].view(-1)) < 0.05
    assert _rel(v, ref32.state[c]["exp_avg_sq"].view(-1)) < 0.05


def test_trajectory_matches_bitsandbytes_and_stays_near_adamw(trajectories):
    start, (a, _), (b, _), (c, _) = trajectories
    moved = c.detach() - start
    assert _rel(a.detach() - start, b.detach() - start) < 0.01  # same algorithm as bitsandbytes' CPU path
    assert _rel(a.detach() - start, moved) < 0.03  # and close to full-precision AdamW


def test_regression_trajectory_close_to_adamw():
    torch.manual_seed(1)
    x, w_true = torch.randn(128, 32), torch.randn(32, 32)
    y = x @ w_true
    out = {}
    for name, kw in (("adamw", {}), ("adamw8bit", {"min_8bit_size": 1})):
        w = torch.nn.Parameter(torch.zeros(32, 32))
        opt = build_optimizer(name, [w], lr=5e-2, weight_decay=0.0, **kw)
        losses = []
        for _ in range(80):
            opt.zero_grad()
            loss = (x @ w - y).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        out[name] = (w.detach(), losses)
    (w32, l32), (w8, l8) = out["adamw"], out["adamw8bit"]
    assert l8[-1] < 0.01 * l8[0]  # it trains
    assert abs(l8[-1] - l32[-1]) < 0.25 * l32[-1]
    assert _rel(w8, w32) < 0.02


def _state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def test_state_bytes_at_most_030_of_adamw():
    shapes = [(576, 576), (1536, 576), (576, 1536), (576,)]  # SmolLM2-135M layer shapes, norm kept fp32
    ps8 = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ps32 = [torch.nn.Parameter(p.detach().clone()) for p in ps8]
    o8, o32 = build_optimizer("adamw8bit", ps8, lr=1e-3), torch.optim.AdamW(ps32, lr=1e-3)
    for p, q in zip(ps8, ps32, strict=True):
        p.grad = torch.randn(p.shape)
        q.grad = p.grad.clone()
    o8.step()
    o32.step()
    n = sum(p.numel() for p in ps8)
    assert _state_bytes(o32) >= 8 * n
    assert _state_bytes(o8) <= 0.3 * _state_bytes(o32)
    big = o8.state[ps8[0]]
    assert big["exp_avg_absmax"].numel() == 576 * 576 // 256  # one fp32 scale per block of 256, counted above
