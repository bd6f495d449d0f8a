"""Exact-match tests of the quantization primitives against straightforward reference math."""

from __future__ import annotations

import pytest
import torch

from slimlm.quant.fp8 import FP8_E4M3_MAX, fp8_fake_quantize, fp8_scale
from slimlm.quant.nf4 import NF4_LEVELS, quantize_nf4
from slimlm.quant.primitives import (
    choose_qparams,
    quantize_per_token_int8,
    quantize_weight,
    resolve_group_size,
)
from slimlm.utils.errors import ConfigError


def ref_asym_row(x: list[float], bits: int) -> tuple[float, int, list[int]]:
    """Scalar reference of the min/max grid containing 0 (the GPTQ reference quantizer)."""
    qmax = 2**bits - 1
    lo, hi = min(min(x), 0.0), max(max(x), 0.0)
    if lo == 0 and hi == 0:
        lo, hi = -1.0, 1.0
    f32 = torch.float32  # same float32 arithmetic as the implementation
    scale = (torch.tensor(hi, dtype=f32) - torch.tensor(lo, dtype=f32)) / qmax
    zero = int(torch.round(-torch.tensor(lo, dtype=f32) / scale))
    q = [min(max(int(torch.round(torch.tensor(v, dtype=torch.float32) / scale)) + zero, 0), qmax) for v in x]
    return float(scale), zero, q


def ref_sym_row(x: list[float], bits: int) -> tuple[float, int, list[int]]:
    qmax = 2**bits - 1
    absmax = max(abs(v) for v in x) or 1.0
    scale = torch.tensor(absmax, dtype=torch.float32) / (qmax / 2)
    zero = 2 ** (bits - 1)
    q = [min(max(int(torch.round(torch.tensor(v, dtype=torch.float32) / scale)) + zero, 0), qmax) for v in x]
    return float(scale), zero, q


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [-1, 4, 8])
def test_quantize_weight_matches_scalar_reference(bits: int, symmetric: bool, group_size: int) -> None:
    torch.manual_seed(bits)
    w = torch.randn(5, 16)
    w[1] = w[1].abs() + 0.1  # all positive row: the grid must still contain 0
    w[2, :8] = 0.0  # an all-zero group
    qw = quantize_weight(w, bits, group_size, symmetric)
    g = 16 if group_size == -1 else group_size
    ref = ref_sym_row if symmetric else ref_asym_row
    for o in range(5):
        for k in range(16 // g):
            scale, zero, q = ref(w[o, k * g : (k + 1) * g].tolist(), bits)
            assert qw.scale[o, k].item() == pytest.approx(scale, rel=0, abs=0)
            assert int(qw.zero[o, k]) == zero
            assert qw.qweight[o, k * g : (k + 1) * g].tolist() == q
    # dequantize == (q - zero) * scale elementwise
    gi = torch.arange(16) // g
    expect = (qw.qweight.float() - qw.zero.float()[:, gi]) * qw.scale[:, gi]
    assert torch.equal(qw.dequantize(), expect)


def test_per_tensor_one_scale() -> None:
    w = torch.randn(4, 8)
    qw = quantize_weight(w, 4, group_size=0)
    scale, zero, q = ref_asym_row(w.flatten().tolist(), 4)
    assert torch.all(qw.scale == torch.tensor(scale)) and torch.all(qw.zero == zero)
    assert qw.qweight.flatten().tolist() == q


def test_rtn_error_bound_and_exact_grid_points() -> None:
    torch.manual_seed(0)
    w = torch.randn(8, 32)
    qw = quantize_weight(w, 4, 8)
    err = (qw.dequantize() - w).abs()
    half_step = qw.scale.repeat_interleave(8, dim=1) / 2
    assert torch.all(err <= half_step + 1e-6)
    # values already on the grid are reproduced exactly
    qw2 = quantize_weight(qw.dequantize(), 4, 8)
    assert torch.allclose(qw2.dequantize(), qw.dequantize(), atol=1e-6)


def test_clip_search_never_worse_and_matches_bruteforce() -> None:
    torch.manual_seed(1)
    w = torch.randn(6, 32)
    w[0, 0] = 12.0  # an outlier makes shrinking worthwhile
    plain = quantize_weight(w, 3, 16)
    clipped = quantize_weight(w, 3, 16, clip_search=True, norm=2.0)
    e_plain = ((plain.dequantize() - w) ** 2).reshape(6, 2, 16).sum(-1)
    e_clip = ((clipped.dequantize() - w) ** 2).reshape(6, 2, 16).sum(-1)
    assert torch.all(e_clip <= e_plain + 1e-6)
    # brute force for one group: best shrink over the same grid
    x = w[0, :16]
    best = min(
        (((torch.clamp(torch.round(x / s) + z, 0, 7) - z) * s - x) ** 2).sum().item()
        for p in [1 - i / 100 for i in range(80)]
        for s, z in [choose_qparams((p * x).reshape(1, -1), 3, -1)]
        for s, z in [(s[0, 0], z[0, 0].float())]
    )
    assert e_clip[0, 0].item() == pytest.approx(best, rel=1e-5)


def test_group_size_must_divide_row_only_where_asked() -> None:
    assert resolve_group_size(576, 64) == 64
    assert resolve_group_size(576, -1) == 576
    assert resolve_group_size(576, 128) == 128  # a shorter last group (576 = 4 x 128 + 64) is the default
    with pytest.raises(ConfigError, match="does not divide"):
        resolve_group_size(576, 128, "model.layers.0.mlp.up_proj", ragged=False)
    with pytest.raises(ConfigError, match="does not divide"):
        quantize_weight(torch.randn(2, 10), 4, 4, ragged=False)
    with pytest.raises(ConfigError, match="2..8"):
        quantize_weight(torch.randn(2, 8), 9, -1)


def test_per_token_int8() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0]])
    q, s = quantize_per_token_int8(x)
    assert q.tolist() == [[64, -127, 32], [0, 0, 0]]  # 1/(2/127) = 63.5 -> 64 (half to even)
    assert s[0, 0].item() == pytest.approx(2 / 127)


def test_nf4_exact_against_reference() -> None:
    torch.manual_seed(2)
    w = torch.randn(4, 64) * 0.05
    nw = quantize_nf4(w, block_size=32, double_quant=False)
    blocks = w.reshape(-1, 32)
    absmax = blocks.abs().amax(1)
    assert torch.equal(nw.absmax, absmax)
    normed = blocks / absmax[:, None]
    ref_codes = (normed.unsqueeze(-1) - NF4_LEVELS).abs().argmin(-1).flatten()  # nearest level
    assert torch.equal(nw.codes.long(), ref_codes)
    assert torch.equal(nw.dequantize(), (NF4_LEVELS[ref_codes].reshape(-1, 32) * absmax[:, None]).reshape(4, 64))
    assert nw.dequantize().abs().amax() == w.abs().amax()  # the absmax is a level (+-1.0)


def test_nf4_double_quant() -> None:
    torch.manual_seed(3)
    w = torch.randn(64, 512)
    nw = quantize_nf4(w, block_size=64, double_quant=True, double_block_size=256)
    single = quantize_nf4(w, block_size=64, double_quant=False)
    assert nw.absmax_codes is not None and nw.absmax_codes.dtype == torch.int8
    # reference: absmax - mean, int8 absmax per 256-block
    c = single.absmax - single.absmax.mean()
    s2 = c.reshape(-1, 256).abs().amax(1) / 127
    q2 = torch.round(c.reshape(-1, 256) / s2[:, None]).flatten()
    assert torch.equal(nw.absmax_codes.float(), q2)
    assert torch.allclose(nw.block_absmax(), single.absmax, atol=float(s2.max()) / 2 + 1e-6)
    # QLoRA: ~0.127 bits/weight of constants instead of 0.5
    assert nw.storage_bits() / w.numel() == pytest.approx(4 + 8 / 64 + 32 * 2 / w.numel() + 32 / w.numel())
    assert 4.12 < nw.storage_bits() / w.numel() < 4.13


def test_fp8_round_trip() -> None:
    x = torch.tensor([[0.0, 1.0, -448.0 * 3], [3.0, 0.1, -0.2]])
    s = fp8_scale(x)
    assert FP8_E4M3_MAX == torch.finfo(torch.float8_e4m3fn).max == 448.0  # e4m3fn: the OCP FP8 spec's largest normal
    assert s.item() == pytest.approx(448 * 3 / 448.0)
    y = fp8_fake_quantize(x)
    ref = (x / s).to(torch.float8_e4m3fn).float() * s
    assert torch.equal(y, ref)
    # per-row scales; e4m3 has 3 mantissa bits: relative error <= 2**-4 for normal values
    y2 = fp8_fake_quantize(x, per_row=True)
    big = x.abs() > 1e-2 * x.abs().amax(-1, keepdim=True)
    assert torch.all(((y2 - x).abs() <= x.abs() * 2**-4 + 1e-9)[big])


def test_ragged_last_group_matches_reference_slicing() -> None:
    # 24 columns in groups of 16: groups [0:16] and [16:24], as the GPTQ reference code slices them
    torch.manual_seed(9)
    w = torch.randn(3, 24)
    qw = quantize_weight(w, 4, 16, ragged=True)
    assert qw.scale.shape == (3, 2) and qw.group_size == 16
    for o in range(3):
        for k, (a, b) in enumerate([(0, 16), (16, 24)]):
            scale, zero, q = ref_asym_row(w[o, a:b].tolist(), 4)
            assert qw.scale[o, k].item() == scale and int(qw.zero[o, k]) == zero
            assert qw.qweight[o, a:b].tolist() == q
    assert torch.equal(qw.dequantize()[:, 16:], quantize_weight(w[:, 16:], 4, -1).dequantize())
