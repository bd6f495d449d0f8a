"""The decode kernels against straightforward torch reference math (and the runtime's own fallback)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from slimlm import kernels
from slimlm.models.rope import apply_rotary
from tests.helpers.kernels import require_kernels


@pytest.fixture(autouse=True)
def _kernels_built() -> None:
    require_kernels()  # skip without AVX2; a failed build on a CPU with AVX2 fails every test here


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(dtype: torch.dtype, rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(203, 77, generator=g).to(dtype)  # odd sizes: vector tails and thread splits
    b = torch.randn(203, generator=g).to(dtype) if bias else None
    x = torch.randn(1, rows, 77, generator=g).to(dtype)
    with torch.inference_mode():
        got = kernels.linear(x, w, b)
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == dtype and got.shape == (1, rows, 203)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_kernels_stay_out_of_autograd_and_large_calls() -> None:
    w = torch.randn(16, 8, requires_grad=True)
    x = torch.randn(2, 8)
    y = kernels.linear(x, w)  # grad mode: must be torch's op so backward works
    y.sum().backward()
    assert w.grad is not None
    with torch.inference_mode():
        big = torch.randn(kernels.SMALL_ROWS + 1, 8)
        assert kernels.rms_norm(big, torch.ones(8), 1e-6) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_matches_reference(dtype: torch.dtype, offset: float) -> None:
    x = (torch.randn(3, 64) * 4).to(dtype)
    w = torch.randn(64).to(dtype)
    with torch.inference_mode():
        got = kernels.rms_norm(x, w, 1e-5, offset)
    assert got is not None
    y = F.rms_norm(x.float(), (64,), eps=1e-5)
    if dtype == torch.bfloat16 and not offset:
        ref = w * y.to(dtype)  # transformers' Llama order: cast, then scale in bf16
        torch.testing.assert_close(got, ref, atol=0, rtol=1e-2)  # at most an ulp apart, from rsqrt
        assert (got != ref).float().mean() < 0.05
    else:
        ref = (y * (offset + w.float())).to(dtype)
        torch.testing.assert_close(got, ref, atol=1e-5 if dtype == torch.float32 else 0, rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_reference(dtype: torch.dtype) -> None:
    gu = torch.randn(2, 2 * 40) * 3
    gu[0, :4] = torch.tensor([-100.0, 100.0, -88.5, 90.0])  # beyond the vector exp's clamped range
    gu = gu.to(dtype)
    with torch.inference_mode():
        got = kernels.silu_mul(gu)
    gate, up = gu.split(40, -1)
    ref = F.silu(gate) * up
    assert got is not None
    torch.testing.assert_close(got, ref, atol=1e-5 if dtype == torch.float32 else 1e-2, rtol=1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_matches_apply_rotary(dtype: torch.dtype) -> None:
    qkv = torch.randn(2, 1, 5 * 16).to(dtype)
    x = qkv[..., 16:].view(2, 1, 4, 16)  # a strided view, as after splitting the fused q/k/v
    ang = torch.randn(2, 1, 1, 16)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    with torch.inference_mode():
        got = kernels.rope(x, cos, sin)
    ref = apply_rotary(x, cos, sin)
    assert got is not None
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-6)
    else:
        torch.testing.assert_close(got, ref, atol=0, rtol=0)  # same rounding points as the torch code


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_attn_decode_matches_sdpa(dtype: torch.dtype, masked: bool) -> None:
    b, h, hkv, d, pos, tmax = 2, 6, 2, 16, 5, 9
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, 1, (h + 2 * hkv) * d, generator=g).to(dtype)
    ang = torch.randn(b, 1, 1, d, generator=g)
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)
    kc = torch.randn(1, b, hkv, tmax, d, generator=g).to(dtype)
    vc = torch.randn(1, b, hkv, tmax, d, generator=g).to(dtype)
    mask = torch.ones(b, 1, 1, pos + 1, dtype=torch.bool)
    if masked:
        mask[0, ..., :2] = False  # a left-padded row
    k2, v2 = kc[0].clone(), vc[0].clone()
    with torch.inference_mode():
        got = kernels.attn_decode(qkv, cos, sin, kc, vc, 0, pos, mask if masked else None, h, hkv, d**-0.5)
    q, k, v = qkv.split([h * d, hkv * d, hkv * d], -1)
    q = apply_rotary(q.view(b, 1, h, d), cos, sin).transpose(1, 2)
    k = apply_rotary(k.view(b, 1, hkv, d), cos, sin).transpose(1, 2)
    k2[:, :, pos:pos + 1], v2[:, :, pos:pos + 1] = k, v.view(b, 1, hkv, d).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q.float(), k2[:, :, :pos + 1].float(), v2[:, :, :pos + 1].float(),
                                         attn_mask=mask if masked else None, enable_gqa=True)
    ref = ref.transpose(1, 2).reshape(b, 1, h * d)
    assert got is not None
    torch.testing.assert_close(kc[0], k2, atol=0, rtol=0)  # the cache write (k after rotary, v as is)
    torch.testing.assert_close(vc[0], v2, atol=0, rtol=0)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_fuses_the_residual_add_as_torch_rounds_it(dtype: torch.dtype) -> None:
    w = torch.randn(48, 40).to(dtype)
    x, res = torch.randn(1, 2, 40).to(dtype), torch.randn(1, 2, 48).to(dtype)
    with torch.inference_mode():
        got = kernels.linear(x, w, None, res)
        plain = kernels.linear(x, w)
    assert got.shape == (1, 2, 48)
    torch.testing.assert_close(got, res + plain, atol=0, rtol=0)


def _decode_logits(lm, ids: torch.Tensor) -> torch.Tensor:  # type: ignore[no-untyped-def]
    from slimlm.models.kv_cache import KVCache

    cache = KVCache.for_model(lm.model.config, ids.shape[0], ids.shape[1] + 4, lm.model.dtype)
    with torch.inference_mode():
        lm.model(ids, cache=cache)
        steps = [lm.model(torch.tensor([[5 + i]]), cache=cache)[:, -1] for i in range(3)]
    return torch.stack(steps)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_call_decode_layers_match_the_torch_path(tmp_path, monkeypatch, dtype: torch.dtype) -> None:  # type: ignore[no-untyped-def]
    from slimlm.loaders import load_model
    from tests.helpers.models import make_hf_model

    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path), dtype=dtype)
    ids = torch.randint(0, 256, (1, 6))
    fast = _decode_logits(lm, ids)
    assert lm.model.model.layers[0].__dict__.get("_plan") is not None  # the one-call path was taken
    monkeypatch.setattr(kernels, "_ext", None)  # torch reference ops only
    ref = _decode_logits(lm, ids)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(fast.float(), ref.float(), atol=tol * ref.abs().max().item(), rtol=0)


def test_one_call_decode_steps_aside_for_hooks_and_swaps(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from slimlm.loaders import load_model
    from tests.helpers.models import make_hf_model

    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path))
    ids = torch.randint(0, 256, (1, 6))
    base = _decode_logits(lm, ids)
    layer = lm.model.model.layers[1]
    seen: list[int] = []
    h = layer.self_attn.o_proj.register_forward_hook(lambda m, a, out: seen.append(out.shape[1]))
    torch.testing.assert_close(_decode_logits(lm, ids), base, rtol=1e-5, atol=1e-6)
    assert seen.count(1) == 3  # the hook saw every decode step
    h.remove()
    down = layer.mlp.down_proj
    new = torch.nn.Linear(down.in_features, down.out_features, bias=False)
    with torch.no_grad():
        new.weight.copy_(down.weight * 2)
    layer.mlp.down_proj = new  # a swapped module is used, not the cached weight
    swapped = _decode_logits(lm, ids)
    assert not torch.allclose(swapped, base)
    monkeypatch.setattr(kernels, "_ext", None)  # the torch reference path with the swapped module
    torch.testing.assert_close(swapped, _decode_logits(lm, ids), rtol=1e-5, atol=1e-6)


def _qgemv_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                     group: int) -> torch.Tensor:
    """x int8-quantized per chunk (absmax / 127, round half to even), times ((q - zero) * scale).T.

    Chunks: each group cut into pieces of the largest of 128/96/64/32 dividing the group size."""
    b, i = x.shape
    size = next(c for c in (128, 96, 64, 32) if group % c == 0)
    xq = torch.empty(b, i, dtype=torch.float64)
    for g0 in range(0, i, group):
        for c0 in range(g0, min(i, g0 + group), size):
            xc = x[:, c0:min(c0 + size, g0 + group, i)].float()
            d = xc.abs().amax(-1, keepdim=True) / 127
            a = torch.where(d > 0, torch.round(xc / torch.where(d > 0, d, 1)), 0).clamp(-127, 127)
            xq[:, c0:c0 + xc.shape[1]] = (a * d).double()
    g = torch.arange(i) // group
    w = (q.double() - (0 if zero is None else zero.double()[:, g])) * scale.double()[:, g]
    return xq @ w.t()


def _check_qlinear(x: torch.Tensor, spec: Any, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                   bias: torch.Tensor, group: int) -> None:
    """``kernels.qlinear`` on ``spec`` equals the int8-activation reference, and with ``residual=res`` equals
    ``res + qlinear(x)`` exactly (the residual is added after rounding to x's dtype, as `res + linear(x)` would be)."""
    o, i = q.shape
    res = torch.randn(x.shape[0], o).to(x.dtype)
    with torch.inference_mode():
        got = kernels.qlinear(x, spec)
        got_res = kernels.qlinear(x, spec, residual=res)
    assert got is not None and got_res is not None and got.dtype == x.dtype
    ref = _qgemv_reference(x, q, scale, zero, i if group == -1 else group) + bias.double()
    tol = 1e-5 if x.dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    torch.testing.assert_close(got_res, res + got, atol=0, rtol=0)


@pytest.mark.parametrize("bits", [8, 4])
# out, in, group, rows; 4-bit with out % 16 == 0 runs on 16-row tiles (qgemv16.cpp), the others row-major
@pytest.mark.parametrize("shape", [(37, 96, 64, 1), (70, 576, 128, 3), (64, 320, -1, 8), (40, 384, 192, 2), (96, 576, 128, 2)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qgemv_matches_int8_activation_reference(bits: int, shape: tuple[int, int, int, int], symmetric: bool,
                                                 dtype: torch.dtype) -> None:
    from slimlm.quant.packing import pack_int4

    o, i, group, rows = shape
    gen = torch.Generator().manual_seed(o + bits)
    ng = 1 if group == -1 else -(-i // group)  # 576 / 128: a short last group
    if bits == 8:
        q = torch.randint(-128, 128, (o, i), generator=gen).to(torch.int8)
        zero = None if symmetric else torch.randint(-20, 20, (o, ng), generator=gen).to(torch.int8)
        codes = q
    else:
        q = torch.randint(0, 16, (o, i), generator=gen).to(torch.uint8)
        zero = torch.full((o, ng), 8, dtype=torch.uint8) if symmetric else torch.randint(0, 16, (o, ng), generator=gen).to(torch.uint8)
        codes = pack_int4(q)
    scale = torch.rand(o, ng, generator=gen) / 50
    bias = torch.randn(o, generator=gen)
    x = torch.randn(rows, i, generator=gen)
    x[:, 5] *= 40  # an outlier channel: only its own chunk loses precision
    x[0, :32] = 0  # an all-zero block
    x = x.to(dtype)
    spec = kernels.quant_spec(codes, bias, scale, zero, group, i)
    assert spec is not None
    _check_qlinear(x, spec, q, scale, zero, bias, group)


@pytest.mark.parametrize("bits", [3, 2])
# out, in, group, rows: a short last group (576 = 4 x 128 + 64), per-row scales, group 96 (chunks of 96)
@pytest.mark.parametrize("shape", [(96, 576, 128, 2), (64, 320, -1, 8), (32, 384, 96, 1), (48, 576, 64, 3)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qgemv_lowbit_tiles_match_int8_activation_reference(bits: int, shape: tuple[int, int, int, int],
                                                            symmetric: bool, dtype: torch.dtype) -> None:
    """2/3-bit codes in their bit-plane tiles (qgemv23.cpp): the same int8-activation math as the reference."""
    o, i, group, rows = shape
    gen = torch.Generator().manual_seed(o + bits)
    ng = 1 if group == -1 else -(-i // group)
    q = torch.randint(0, 2**bits, (o, i), generator=gen).to(torch.uint8)
    q[0] = 2**bits - 1  # a row of the largest code: the high bit everywhere
    zero = torch.full((o, ng), 2 ** (bits - 1), dtype=torch.uint8) if symmetric else \
        torch.randint(0, 2**bits, (o, ng), generator=gen).to(torch.uint8)
    scale = torch.rand(o, ng, generator=gen) / 50
    bias = torch.randn(o, generator=gen)
    x = torch.randn(rows, i, generator=gen)
    x[:, 5] *= 40
    x[0, :32] = 0
    x = x.to(dtype)
    spec = kernels.quant_spec(q, bias, scale, zero, group, i, bits=bits)
    assert spec is not None and spec[0].shape == (o // 16, i // 32, 64 * bits)  # bits / 8 bytes per weight
    assert torch.equal(kernels.untile_lowbit(spec[0]), q)
    _check_qlinear(x, spec, q, scale, zero, bias, group)
    # the prefill path de-quantizes the same tiles: (q - zero) * scale in fp32, then rounded to bf16
    g = torch.arange(i) // (i if group == -1 else group)
    w = (q.float() - zero.float()[:, g]) * scale[:, g]
    z: torch.Tensor | float = 2.0 ** (bits - 1) if symmetric else zero.float()
    assert torch.equal(kernels.dequant_tiles(spec[0], scale, z, group, torch.float32), w)  # type: ignore[arg-type]
    assert torch.equal(kernels.dequant_tiles(spec[0], scale, z, group, torch.bfloat16), w.bfloat16())  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("sizes", [(64, 24, 40), (64, 32, 48)])  # 4-bit: row-major, and 16-row tiles
def test_qgemv_cat_equals_separate_calls(bits: int, sizes: tuple[int, int, int]) -> None:
    """q|k|v (or gate|up) in one pass: x quantized once, every row computed as in its own call."""
    from slimlm.quant.packing import pack_int4

    gen = torch.Generator().manual_seed(bits)
    specs = []
    for o in sizes:
        if bits == 3 and o % 16:  # a 3-bit linear with O % 16 != 0 holds int8 codes
            q = torch.randint(0, 8, (o, 256), generator=gen).to(torch.int8)
        else:
            q = torch.randint(-128, 128, (o, 256), generator=gen).to(torch.int8) if bits == 8 else \
                torch.randint(0, 2**bits, (o, 256), generator=gen).to(torch.uint8)
        zero = torch.randint(0, 2 ** min(bits, 4), (o, 2), generator=gen).to(q.dtype)
        if bits == 4:
            q = pack_int4(q)
        spec = kernels.quant_spec(q, torch.randn(o, generator=gen), torch.rand(o, 2, generator=gen), zero, 128, 256,
                                  bits=3 if bits == 3 and o % 16 == 0 else None)
        assert spec is not None
        specs.append(spec)
    x = torch.randn(2, 1, 256, generator=gen)
    with torch.inference_mode():
        got = kernels.load().qgemv_cat(x, [t for s in specs for t in s])
        sep = torch.cat([kernels.qlinear(x, s) for s in specs], -1)  # type: ignore[misc]
    assert got.shape == (2, 1, sum(sizes)) and torch.equal(got, sep)
    if bits in (3, 4):  # tiled exactly when O % 16 == 0 (sizes0 mixes both layouts in one call)
        assert [s[0].dim() for s in specs] == [3 if o % 16 == 0 else 2 for o in sizes]


@pytest.mark.parametrize("bits,symmetric", [(3, False), (2, True), (5, False)])
def test_intx_decode_calls_run_qgemv_on_unpacked_codes(bits: int, symmetric: bool) -> None:
    """2/3/5-bit linears: decode-size calls take qgemv on the one runtime layout (bit-plane tiles for 2/3 bits,
    int8 codes for 5; the exact int8-activation math of the reference), larger calls de-quantize it;
    act-order codes are held in group-contiguous column order and x is permuted to match."""
    from slimlm.quant.linear import IntxWeightLinear
    from slimlm.quant.primitives import choose_qparams, quantize_codes
    from slimlm.quant.qtensor import QuantizedWeight

    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(48, 576, generator=gen)
    scale, zero = choose_qparams(w, bits, 128, symmetric, ragged=True)  # 576 = 4 x 128 + 64
    g = torch.arange(576) // 128
    q = quantize_codes(w, scale[:, g], zero[:, g], bits)
    mod = IntxWeightLinear.from_quantized(QuantizedWeight(q.to(torch.uint8), scale, zero, bits, 128, symmetric))
    spec = mod.decode_spec()
    assert spec is not None and mod.qweight is None  # one runtime layout, read by every call
    if bits < 4:  # 2/3-bit codes in their bit-plane tiles (bits / 8 bytes per weight)
        assert spec[0].dtype == torch.uint8 and spec[0].shape == (48 // 16, 576 // 32, 64 * bits)
    else:  # 5-bit: int8 codes
        assert spec[0].dtype == torch.int8 and spec[0].shape == (48, 576)
    x = torch.randn(2, 576, generator=gen)
    xb = torch.randn(9, 576, generator=gen)
    with torch.inference_mode():
        got = mod(x)
        big = mod(xb)
    ref = _qgemv_reference(x, q, scale, zero, 128)
    torch.testing.assert_close(got.double(), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    g = torch.arange(576) // 128  # larger calls: fp32 activations times the de-quantized weight
    ref_big = xb.double() @ ((q.double() - zero.double()[:, g]) * scale.double()[:, g]).t()
    torch.testing.assert_close(big.double(), ref_big, atol=1e-5 * ref_big.abs().max().item(), rtol=0)
    qa = QuantizedWeight(q.to(torch.uint8), scale, zero, bits, 128, symmetric, g_idx=torch.randperm(576, generator=gen) // 128)
    ma = IntxWeightLinear.from_quantized(qa)
    assert ma.decode_spec() is None  # act-order: the codes are held permuted, which decode_layer cannot take
    with torch.inference_mode():  # the module permutes x itself: the same int8-activation math
        got_a = ma(x)
    perm = torch.sort(qa.g_idx.long(), stable=True).indices
    ref_a = _qgemv_reference(x[:, perm], q[:, perm], scale, zero, 128)
    torch.testing.assert_close(got_a.double(), ref_a, atol=1e-5 * ref_a.abs().max().item(), rtol=0)


def test_quant_spec_refuses_layouts_qgemv_cannot_read() -> None:
    codes = torch.zeros(8, 48, dtype=torch.int8)
    assert kernels.quant_spec(codes, None, torch.ones(8, 1), None, -1, 48) is None  # 48 is not a multiple of 32
    codes = torch.zeros(8, 64, dtype=torch.int8)
    assert kernels.quant_spec(codes, None, torch.ones(8, 4), None, 16, 64) is None  # group 16 < one block
    assert kernels.quant_spec(codes, None, torch.ones(8, 3), None, 32, 64) is None  # wrong number of groups
    assert kernels.quant_spec(codes, None, torch.ones(8, 2), None, 32, 64) is not None


@pytest.mark.parametrize("cfg", [dict(bits=8, group_size=-1, symmetric=True), dict(bits=8, group_size=32, symmetric=False),
                                 dict(bits=4, group_size=32, symmetric=False), dict(bits=4, group_size=-1, symmetric=True),
                                 dict(bits=3, group_size=32, symmetric=False)])
def test_one_call_decode_runs_quantized_layers_like_the_module_path(tmp_path, monkeypatch, cfg) -> None:  # type: ignore[no-untyped-def]
    from slimlm.loaders import load_model
    from slimlm.quant.api import quantize_
    from slimlm.quant.methods.rtn import RTNConfig
    from tests.helpers.models import make_hf_model

    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path))
    quantize_(lm.model, RTNConfig(**cfg, ignore=[]))  # lm_head too: the module path takes qgemv as well
    ids = torch.randint(0, 256, (1, 6))
    fast = _decode_logits(lm, ids)
    layer = lm.model.model.layers[0]
    plan = layer.__dict__.get("_plan")
    qkv = plan[2][2][0] if plan is not None else []
    assert len(qkv) == 15  # q, k and v as three quantized specs of 5 tensors
    assert all(qkv[i].numel() == 1 for i in (4, 9, 14))  # ... run by qgemv (a group size is set)
    hook = layer.self_attn.q_proj.register_forward_pre_hook(lambda m, a: None)  # a hook inside: module by module
    per_module = _decode_logits(lm, ids)
    hook.remove()
    # the same qgemv calls module by module (the torch path around them differs only in fp32 rounding)
    torch.testing.assert_close(per_module, fast, atol=1e-5 * fast.abs().max().item(), rtol=0)
    monkeypatch.setattr(kernels, "_ext", None)
    ref = _decode_logits(lm, ids)  # the modules' own path (bf16 or fp32 activations, no int8 rounding)
    torch.testing.assert_close(fast, ref, atol=3e-2 * ref.abs().max().item(), rtol=0)


def test_decode_plan_follows_a_reloaded_quantized_linear(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Loading a state dict into a quantized linear makes its kernel spec stale: the cached layer plan
    must notice (the spec is one of its identity links) instead of running the old zero*scale."""
    from slimlm.loaders import load_model
    from slimlm.quant.api import quantize_
    from slimlm.quant.methods.rtn import RTNConfig
    from tests.helpers.models import make_hf_model

    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path))
    quantize_(lm.model, RTNConfig(bits=4, group_size=32))
    ids = torch.randint(0, 256, (1, 6))
    base = _decode_logits(lm, ids)
    layer = lm.model.model.layers[0]
    q = layer.self_attn.q_proj
    sd = q.state_dict()
    sd["scale"] = sd["scale"] * 3  # a different model, loaded in place into the same tensors
    q.load_state_dict(sd)
    stale = _decode_logits(lm, ids)  # spec cleared until processed: the plan steps aside
    q.process_after_loading()
    fresh = _decode_logits(lm, ids)
    assert layer.__dict__["_plan"] is not None  # back on the one-call path ...
    monkeypatch.setattr(kernels, "_ext", None)
    ref = _decode_logits(lm, ids)  # the torch path with the new scales
    assert not torch.allclose(ref, base)
    for got in (stale, fresh):  # ... and neither step used the old zero * scale
        torch.testing.assert_close(got, ref, atol=3e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize("bf16_dot", [True, False])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 8])
def test_nf4_gemv_matches_the_dequantized_weight(double_quant: bool, dtype: torch.dtype, rows: int, bf16_dot: bool) -> None:
    """Both kernel paths (AVX2 fp32 dots; AVX-512 BF16 dots with hi/lo bf16 levels, where the CPU has
    them) give the exact product of x and the de-quantized weight up to the output's rounding."""
    from slimlm.quant.linear.nf4 import NF4Linear, _nf4_kernel
    from slimlm.quant.nf4 import quantize_nf4

    assert _nf4_kernel() is not None  # the extension carries it wherever the kernels build
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(40, 192, generator=g)  # 3 blocks of 64 per row; 40 rows: uneven thread split
    bias = torch.randn(40, generator=g)
    mod = NF4Linear.from_quantized(quantize_nf4(w, block_size=64, double_quant=double_quant, double_block_size=16), bias)
    x = torch.randn(rows, 192, generator=g).to(dtype)
    with torch.inference_mode():
        got = mod._gemv(x, bf16_dot)
        assert got is not None  # the kernel took the call
        got = got + bias.to(dtype)
        if bf16_dot:
            assert torch.equal(mod(x), got)  # the module's forward is that kernel call
    ref = F.linear(x.double(), mod.dense_weight().double(), bias.double())  # de-quantized weight, exact math
    assert got.dtype == dtype and got.shape == (rows, 40)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got.double(), ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_nf4_gemv_leaves_straddling_blocks_large_calls_and_autograd_to_torch() -> None:
    from slimlm.quant.linear.nf4 import NF4Linear
    from slimlm.quant.nf4 import quantize_nf4

    mod = NF4Linear.from_quantized(quantize_nf4(torch.randn(8, 96), block_size=64))  # blocks straddle rows
    with torch.inference_mode():
        assert mod._gemv(torch.randn(1, 96)) is None
    mod = NF4Linear.from_quantized(quantize_nf4(torch.randn(8, 128), block_size=64))
    with torch.inference_mode():
        assert mod._gemv(torch.randn(9, 128)) is None
    x = torch.randn(2, 128, requires_grad=True)
    assert mod._gemv(x) is None
    mod(x).sum().backward()
    assert x.grad is not None


def test_qgemv_avx2_and_avx512_vnni_paths_agree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """qgemv picks AVX-512 VNNI where the CPU has it and AVX2 elsewhere (SLIMLM_QGEMV_AVX2=1 forces
    AVX2): the integer sums are the same, so the outputs agree to fp32 summation order."""
    import subprocess
    import sys

    script = tmp_path / "run.py"
    script.write_text(
        "import sys, torch\n"
        "from slimlm import kernels\n"
        "from slimlm.quant.packing import pack_int4\n"
        "g = torch.Generator().manual_seed(0)\n"
        "outs = []\n"
        "for bits, o, i, group in ((4, 40, 576, 128), (4, 33, 96, 96), (4, 48, 576, 128), (8, 37, 576, -1), (8, 24, 352, 32),\n"
        "                          (3, 48, 576, 128), (2, 32, 384, 96)):\n"
        "    q = torch.randint(0, 2 ** bits, (o, i), generator=g).to(torch.uint8) if bits < 8 else torch.randint(-128, 128, (o, i), generator=g).to(torch.int8)\n"
        "    ng = 1 if group == -1 else -(-i // group)\n"
        "    zero = torch.randint(0, 2 ** min(bits, 4), (o, ng), generator=g).to(q.dtype)\n"
        "    spec = kernels.quant_spec(pack_int4(q) if bits == 4 else q, torch.randn(o, generator=g), torch.rand(o, ng, generator=g), zero, group, i,\n"
        "                              bits=bits if bits < 4 else None)\n"
        "    for rows in (1, 3):\n"
        "        with torch.inference_mode():\n"
        "            outs.append(kernels.qlinear(torch.randn(rows, i, generator=g), spec))\n"
        "torch.save(outs, sys.argv[1])\n")
    import os

    env = {k: v for k, v in os.environ.items() if k != "SLIMLM_QGEMV_AVX2"}
    root = str(Path(__file__).resolve().parents[2])
    for name, extra in (("default", {}), ("avx2", {"SLIMLM_QGEMV_AVX2": "1"})):
        subprocess.run([sys.executable, str(script), str(tmp_path / f"{name}.pt")], check=True, cwd=root,
                       env={**env, **extra, "PYTHONPATH": root})
    a, b = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in ("default", "avx2"))
    assert len(a) == len(b) == 14
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5 * y.abs().max().item(), rtol=0)


def test_build_name_follows_the_sources(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Each version of the kernel sources builds under its own name (no rebuilds between checkouts)."""
    src = tmp_path / "a.cpp"
    src.write_text("int f() { return 1; }")
    monkeypatch.setattr(kernels, "_SRC", [src])
    first = kernels._build_name()
    assert first.startswith("slimlm_decode_kernels_") and kernels._build_name() == first
    src.write_text("int f() { return 2; }")
    assert kernels._build_name() != first
