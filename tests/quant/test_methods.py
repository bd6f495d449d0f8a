"""Method math on tiny layers: GPTQ and AWQ beat RTN on the output error, SmoothQuant/LLM.int8() pieces."""

from __future__ import annotations

import torch
from torch import nn

from slimlm.quant.config import WeightQuantConfig
from slimlm.quant.methods.awq import output_error, search_clip, search_scale
from slimlm.quant.methods.gptq import accumulate_hessian, gptq_quantize, gram, make_hessian
from slimlm.quant.methods.int8_outlier import int8_outlier_reference, outlier_columns, split_outliers
from slimlm.quant.methods.smoothquant import SmoothQuantAlgorithm, SmoothQuantConfig, smoothing_scale
from slimlm.quant.primitives import choose_qparams, quantize_codes, quantize_per_token_int8, quantize_weight
from slimlm.quant.qtensor import QuantizedWeight


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)  # [n, d], correlated features


def out_err(w: torch.Tensor, qw: QuantizedWeight, x: torch.Tensor) -> float:
    return float(torch.linalg.norm(x @ w.t() - x @ qw.dequantize().t()))


def test_hessian_accumulation_matches_closed_form() -> None:
    x = correlated_inputs(96, 16)
    h, n = make_hessian(16), 0
    for chunk in x.split(32):
        h, n = accumulate_hessian(h, n, chunk)
    assert n == 96
    assert torch.allclose(h, 2 * x.t() @ x / 96, rtol=1e-5, atol=1e-5)


def reference_gptq(w: torch.Tensor, h: torch.Tensor, bits: int, g: int, symmetric: bool, act_order: bool,
                   damp: float, block: int) -> torch.Tensor:
    """GPTQ as the paper's reference code writes it, one column at a time; returns the codes [out, in]."""
    w, h = w.clone(), h.clone()
    out, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale, zero = choose_qparams(w, bits, g, symmetric)  # only used as-is with act-order (static groups)
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros(out, cols, dtype=torch.int32)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = w[:, i1:i2].clone(), torch.zeros(out, i2 - i1), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            orig = int(perm[i1 + i])
            gi = orig // g
            if not act_order and orig % g == 0:
                s, z = choose_qparams(torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :g], bits, -1, symmetric)
                scale[:, gi], zero[:, gi] = s[:, 0], z[:, 0]
            q = quantize_codes(w1[:, i], scale[:, gi], zero[:, gi], bits)
            codes[:, i1 + i] = q
            e = (w1[:, i] - (q.float() - zero[:, gi].float()) * scale[:, gi]) / hinv1[i, i]
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)]


def test_gptq_codes_match_the_reference_column_loop() -> None:
    torch.manual_seed(3)
    w = torch.randn(16, 96)
    x = correlated_inputs(400, 96, seed=3)
    x[:, 7] = 0.0
    h = 2 * x.t() @ x / x.shape[0]
    for bits, g, sym, act, block in [(4, 32, False, True, 32), (3, 32, False, False, 16), (4, 48, True, True, 40),
                                     (2, 96, False, False, 128), (8, 32, True, False, 32)]:
        qw, _ = gptq_quantize(w, h, bits, g, symmetric=sym, act_order=act, damp=0.01, block_size=block)
        ref = reference_gptq(w, h, bits, g, sym, act, 0.01, block)
        assert torch.equal(qw.qweight.to(torch.int32), ref), (bits, g, sym, act, block)


def test_gptq_sweep_kernel_equals_the_torch_sweep() -> None:
    import pytest

    from slimlm.quant.methods.gptq import _sweep_kernel, _sweep_torch

    kernel = _sweep_kernel()
    if kernel is None:
        pytest.skip("slimlm's C++ kernels are unavailable here (the torch sweep is used)")
    gen = torch.Generator().manual_seed(4)
    out, b = 37, 48
    a = torch.randn(b, b, generator=gen)
    hinv1 = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(a @ a.t() + b * torch.eye(b))),
                                  upper=True).contiguous()
    scale = torch.rand(out, 3, generator=gen) * 0.1 + 0.01
    zero = torch.randint(0, 16, (out, 3), generator=gen).float()
    groups = torch.randint(0, 3, (b,), generator=gen)
    w = torch.randn(out, b, generator=gen)
    runs = []
    for fn in (_sweep_torch, kernel):
        w1, q1, err1 = w.clone(), torch.zeros(out, b), torch.zeros(out, b)
        fn(w1, q1, err1, hinv1, scale, zero, groups, 0, 20, 15.0)
        fn(w1, q1, err1, hinv1, scale, zero, groups, 20, b, 15.0)  # a block split where a group starts
        runs.append((w1, q1, err1))
    for x, y in zip(*runs, strict=True):
        assert torch.equal(x, y)
    assert runs[0][1].max() == 15 and runs[0][1].min() == 0  # the grid is used end to end


def test_gram_is_exactly_symmetric_and_matches_xtx() -> None:
    x = correlated_inputs(300, 1000)
    gm = gram(x, panel=384)
    assert torch.equal(gm, gm.t())
    assert torch.allclose(gm, x.t() @ x, rtol=1e-4, atol=1e-2)
    assert torch.equal(gram(x[:, :200]), x[:, :200].t() @ x[:, :200])  # narrower than a panel: one matmul


def test_gptq_beats_rtn_on_output_error() -> None:
    torch.manual_seed(0)
    w = torch.randn(24, 64)
    x = correlated_inputs(512, 64)
    h = 2 * x.t() @ x / x.shape[0]
    for bits, gs in [(4, 16), (3, 32), (2, -1)]:
        rtn = quantize_weight(w, bits, gs)
        for act_order in (False, True):
            qw, loss = gptq_quantize(w, h, bits, gs, act_order=act_order, damp=0.01, block_size=16)
            assert qw.qweight.max() < 2**bits and qw.g_idx is None
            assert out_err(w, qw, x) < 0.85 * out_err(w, rtn, x), (bits, gs, act_order)
            assert loss > 0
            # lazy block updates are only a reordering of the same arithmetic: block 1 == block 16
            qw1, _ = gptq_quantize(w, h, bits, gs, act_order=act_order, damp=0.01, block_size=1)
            assert torch.equal(qw1.qweight, qw.qweight)


def test_gptq_with_identity_hessian_is_rtn() -> None:
    # no correlation between inputs -> no error to propagate -> plain rounding
    torch.manual_seed(1)
    w = torch.randn(8, 32)
    qw, _ = gptq_quantize(w, torch.eye(32), 4, 8, act_order=False, damp=0.0, block_size=8)
    rtn = quantize_weight(w, 4, 8)
    assert torch.equal(qw.qweight, rtn.qweight) and torch.equal(qw.scale, rtn.scale)


def test_gptq_dead_inputs_and_symmetric() -> None:
    torch.manual_seed(2)
    w = torch.randn(8, 32)
    x = correlated_inputs(128, 32)
    x[:, 5] = 0.0  # a dead input column: its weight is irrelevant and set to 0
    h = 2 * x.t() @ x / 128
    qw, _ = gptq_quantize(w, h, 4, 16, symmetric=True, act_order=True)
    assert torch.all(qw.zero == 8)
    assert torch.all(qw.dequantize()[:, 5] == 0)


def outlier_inputs(n: int = 512, d: int = 64) -> torch.Tensor:
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(3))
    x[:, :4] *= 25.0  # a few salient channels, as in LLM activations
    return x


def test_awq_beats_rtn_on_tiny_layer_with_outlier_channels() -> None:
    torch.manual_seed(4)
    w = torch.randn(32, 64) * 0.1
    x = outlier_inputs()
    h = x.t() @ x
    cfg = WeightQuantConfig(bits=3, group_size=32)
    s, alpha, errs = search_scale([w], [cfg], x.abs().mean(0), h, 20)
    assert alpha > 0 and errs[0] == max(errs[0], min(errs))  # alpha=0 is RTN
    w_awq = quantize_weight(w * s, 3, 32).dequantize() / s
    rtn = quantize_weight(w, 3, 32).dequantize()
    e_awq = float(torch.linalg.norm(x @ w_awq.t() - x @ w.t()))
    e_rtn = float(torch.linalg.norm(x @ rtn.t() - x @ w.t()))
    assert e_awq < 0.8 * e_rtn
    # the Hessian form of the error equals the direct one
    assert abs(output_error(w, rtn, h) - e_rtn**2) < 1e-3 * e_rtn**2


def test_awq_clip_search_lowers_error() -> None:
    torch.manual_seed(5)
    w = torch.randn(16, 64)
    w[:, 3] *= 8  # weight outliers make clipping pay off
    x = torch.randn(256, 64)
    h = x.t() @ x
    cfg = WeightQuantConfig(bits=3, group_size=32)
    clipped = search_clip(w, h, cfg, grid=20, max_shrink=0.5)
    e_clip = output_error(w, quantize_weight(clipped, 3, 32).dequantize(), h)
    e_rtn = output_error(w, quantize_weight(w, 3, 32).dequantize(), h)
    assert e_clip <= e_rtn


def test_smoothing_scale_formula_and_equivalence() -> None:
    torch.manual_seed(6)
    w = torch.randn(8, 16)
    x = outlier_inputs(64, 16)
    act_max = x.abs().amax(0)
    s = smoothing_scale(act_max, [w], 0.5)
    assert torch.allclose(s, act_max.sqrt() / w.abs().amax(0).sqrt())
    # (x / s) (w * s)^T == x w^T, and the smoothed activations quantize better per token
    assert torch.allclose((x / s) @ (w * s).t(), x @ w.t(), atol=1e-4)

    def w8a8(xx: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
        q, sc = quantize_per_token_int8(xx)
        return (q.float() * sc) @ quantize_weight(ww, 8, -1, True).dequantize().t()

    ref = x @ w.t()
    assert (w8a8(x / s, w * s) - ref).norm() < (w8a8(x, w) - ref).norm()


def test_smoothquant_folds_into_norm() -> None:
    from slimlm.models.layers import Norm

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp_norm = Norm(16)
            self.mlp = nn.Module()
            self.mlp.gated = False  # type: ignore[assignment]
            self.mlp.up_proj = nn.Linear(16, 8)
            self.mlp.down_proj = nn.Linear(8, 16)

    torch.manual_seed(7)
    blk = Block()
    x = outlier_inputs(32, 16)
    before = blk.mlp.up_proj(blk.mlp_norm(x))
    algo = SmoothQuantAlgorithm(SmoothQuantConfig())
    algo.accumulate("mlp.up_proj", blk.mlp.up_proj, blk.mlp_norm(x))
    up = blk.mlp.up_proj
    algo.finish_group(0, blk, ["mlp.up_proj"])
    assert "model.layers.0.mlp.up_proj" in algo.scales
    assert torch.allclose(up(blk.mlp_norm(x)), before, atol=1e-4)  # folding keeps the function


def test_int8_outlier_columns_and_math() -> None:
    x = outlier_inputs(128, 64)
    cols = outlier_columns(x.abs().amax(0), 6.0)
    assert cols.tolist() == [0, 1, 2, 3]
    assert outlier_columns(x.abs().amax(0), 6.0, max_fraction=2 / 64).numel() == 2
    torch.manual_seed(8)
    w = torch.randn(16, 64)
    qw, w_out = split_outliers(w, cols)
    assert torch.all(qw.dequantize()[:, cols] == 0) and torch.equal(w_out, w[:, cols])
    y = int8_outlier_reference(x, qw, cols, w_out)
    q, s = quantize_per_token_int8(x)
    naive = (q.float() * s) @ quantize_weight(w, 8, -1, True).dequantize().t()
    ref = x @ w.t()
    assert (y - ref).norm() < 0.5 * (naive - ref).norm()


def test_awq_fold_into_preceding_linear_keeps_function() -> None:
    from slimlm.quant.methods.awq import fold_scale, preceding

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mlp = nn.Module()
            self.mlp.gated = True  # type: ignore[assignment]
            self.mlp.gate_proj = nn.Linear(8, 16, bias=False)
            self.mlp.up_proj = nn.Linear(8, 16, bias=True)
            self.mlp.down_proj = nn.Linear(16, 8, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = self.mlp
            return m.down_proj(torch.nn.functional.silu(m.gate_proj(x)) * m.up_proj(x))

    torch.manual_seed(10)
    layer = Layer()
    x = torch.randn(5, 8)
    before = layer(x)
    prev = preceding(layer, ["mlp.down_proj"])
    assert prev is layer.mlp.up_proj
    fold_scale(prev, [layer.mlp.down_proj], torch.rand(16) + 0.5)
    assert torch.allclose(layer(x), before, atol=1e-5)
    layer.mlp.gated = False  # type: ignore[assignment]  # act(up(x)) is not linear in up: no fold
    assert preceding(layer, ["mlp.down_proj"]) is None


def test_gptq_reference_protocol_config() -> None:
    from slimlm.quant.methods.gptq import GPTQConfig

    c = GPTQConfig.reference_protocol(bits=3, act_order=True)
    assert (c.bits, c.group_size, c.symmetric, c.damp, c.block_size, c.true_sequential) == (
        3, 128, False, 0.01, 128, False)
