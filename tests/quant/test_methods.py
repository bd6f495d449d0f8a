"""Method math on tiny layers: GPTQ and AWQ beat RTN on the output error, SmoothQuant/LLM.int8() pieces."""

from __future__ import annotations

import pytest
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
                   damp: float, block: int) -> tuple[torch.Tensor, float]:
    """GPTQ as the paper's reference code writes it, one column at a time; returns the codes [out, in]
    and the loss the reference code reports (sum of err^2 / 2, err = (w - q) / [H^-1]_jj)."""
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
    loss = 0.0
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
            loss += float((e**2).sum()) / 2
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)], loss


def test_gptq_codes_match_the_reference_column_loop() -> None:
    torch.manual_seed(3)
    w = torch.randn(16, 96)
    x = correlated_inputs(400, 96, seed=3)
    x[:, 7] = 0.0
    h = 2 * x.t() @ x / x.shape[0]
    for bits, g, sym, act, block in [(4, 32, False, True, 32), (3, 32, False, False, 16), (4, 48, True, True, 40),
                                     (2, 96, False, False, 128), (8, 32, True, False, 32)]:
        qw, loss = gptq_quantize(w, h, bits, g, symmetric=sym, act_order=act, damp=0.01, block_size=block)
        ref, ref_loss = reference_gptq(w, h, bits, g, sym, act, 0.01, block)
        assert torch.equal(qw.qweight.to(torch.int32), ref), (bits, g, sym, act, block)
        assert abs(loss - ref_loss) <= 1e-4 * ref_loss, (loss, ref_loss)


def test_gptq_sweep_kernel_equals_the_torch_sweep() -> None:
    from slimlm.quant.methods.gptq import _sweep_kernel, _sweep_torch
    from tests.helpers.kernels import require_kernels

    require_kernels()  # skip without AVX2; fail if the kernels did not build on a CPU with it
    kernel = _sweep_kernel()
    assert kernel is not None
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
    w_awq = quantize_weight(w * s, 3, 32).dequantize() / s
    rtn = quantize_weight(w, 3, 32).dequantize()
    e_awq = float(torch.linalg.norm(x @ w_awq.t() - x @ w.t()))
    e_rtn = float(torch.linalg.norm(x @ rtn.t() - x @ w.t()))
    assert e_awq < 0.8 * e_rtn
    # oracle: the AWQ grid search written out, s = mean|x|^alpha for alpha = i / 20, the error measured on x
    # directly (the geometric-mean normalization of s only rescales the grid: same errors up to rounding)
    ref_errs = []
    for i in range(20):
        si = x.abs().mean(0).pow(i / 20).clamp(min=1e-4)
        wi = quantize_weight(w * si, 3, 32).dequantize() / si
        ref_errs.append(float(torch.linalg.norm(x @ wi.t() - x @ w.t())) ** 2)
    assert ref_errs[0] == pytest.approx(e_rtn**2, rel=1e-6)  # alpha = 0 is RTN
    assert errs == pytest.approx(ref_errs, rel=1e-3)
    best = min(range(20), key=ref_errs.__getitem__)
    assert best > 0 and alpha == best / 20 and e_awq**2 == pytest.approx(ref_errs[best], rel=1e-3)
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
    assert e_clip < 0.95 * e_rtn
    # oracle: brute force per row and group over the ten clip ratios 1 - i/20, error on x directly
    for o in range(16):
        for k in range(2):
            wg, xg = w[o, 32 * k : 32 * (k + 1)], x[:, 32 * k : 32 * (k + 1)]
            cands = [wg.clamp(-(1 - i / 20) * wg.abs().max(), (1 - i / 20) * wg.abs().max()) for i in range(10)]
            errs = [float((xg @ (quantize_weight(c[None], 3, -1).dequantize()[0] - wg)).square().sum()) for c in cands]
            assert torch.equal(clipped[o, 32 * k : 32 * (k + 1)], cands[min(range(10), key=errs.__getitem__)]), (o, k)


def test_smoothing_scale_formula_and_equivalence() -> None:
    torch.manual_seed(6)
    w = torch.randn(8, 16)
    x = outlier_inputs(64, 16)
    act_max = x.abs().amax(0)
    s = smoothing_scale(act_max, [w], 0.5)
    assert torch.allclose(s, act_max.sqrt() / w.abs().amax(0).sqrt())
    # the paper's s_j = max|X_j|^a / max|W_j|^(1-a) at a != 1/2 (tells a from 1 - a), over two weights
    w2 = torch.randn(4, 16) * 3
    s8 = smoothing_scale(act_max, [w, w2], 0.8)
    wmax = torch.maximum(w.abs().amax(0), w2.abs().amax(0))
    assert torch.allclose(s8, act_max**0.8 / wmax**0.2, rtol=1e-5)
    # the smoothed activations quantize better per token

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
    normed, w0 = blk.mlp_norm(x).detach(), blk.mlp.up_proj.weight.detach().clone()
    algo = SmoothQuantAlgorithm(SmoothQuantConfig())
    algo.accumulate("mlp.up_proj", blk.mlp.up_proj, blk.mlp_norm(x))
    up = blk.mlp.up_proj
    algo.finish_group(0, blk, ["mlp.up_proj"])
    # oracle: s = max|x|^0.5 / max|W|^0.5 per input channel; W absorbs s, the norm's output 1/s
    s = normed.abs().amax(0).sqrt() / w0.abs().amax(0).sqrt()
    assert torch.allclose(algo.scales["model.layers.0.mlp.up_proj"], s, rtol=1e-5)
    assert torch.allclose(up.weight, w0 * s, rtol=1e-5)
    assert torch.allclose(blk.mlp_norm(x) * s, normed, rtol=1e-4, atol=1e-5)
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
    up_w, up_b, down_w = (t.detach().clone() for t in (prev.weight, prev.bias, layer.mlp.down_proj.weight))
    s = torch.rand(16) + 0.5
    with torch.no_grad():
        fold_scale(prev, [layer.mlp.down_proj], s)
    # up's output rows (weight and bias) are divided by s, down's input columns multiplied by it
    assert torch.allclose(prev.weight, up_w / s[:, None]) and torch.allclose(prev.bias, up_b / s)
    assert torch.allclose(layer.mlp.down_proj.weight, down_w * s[None, :])
    assert torch.allclose(layer(x), before, atol=1e-5)
    layer.mlp.gated = False  # type: ignore[assignment]  # act(up(x)) is not linear in up: no fold
    assert preceding(layer, ["mlp.down_proj"]) is None


def test_gptq_reference_protocol_config() -> None:
    """The REFERENCE.md protocol (asymmetric, g128, damp 0.01, block 128, act-order with static groups), run
    through the algorithm's own glue, gives the codes of the reference column loop with those settings."""
    from slimlm.models.modules import linear_weight
    from slimlm.quant.methods.gptq import GPTQAlgorithm, GPTQConfig

    c = GPTQConfig.reference_protocol(bits=3, act_order=True)
    assert not c.true_sequential
    layer = nn.Module()
    layer.mlp = nn.Module()
    layer.mlp.down_proj = nn.Linear(256, 12, bias=False)
    w = layer.mlp.down_proj.weight.detach().clone()
    x = correlated_inputs(300, 256, seed=11)
    algo = GPTQAlgorithm(c)
    algo.begin_layer(0, layer)
    algo.accumulate("mlp.down_proj", layer.mlp.down_proj, x)
    with torch.no_grad():
        algo.finish_group(0, layer, ["mlp.down_proj"])
    codes, _ = reference_gptq(w, 2 * x.t() @ x / 300, 3, 128, False, True, 0.01, 128)
    scale, zero = choose_qparams(w, 3, 128, False)  # static groups: grids of the original weight
    gi = torch.arange(256) // 128
    torch.testing.assert_close(linear_weight(layer.mlp.down_proj), (codes - zero[:, gi]) * scale[:, gi], rtol=0, atol=1e-6)
