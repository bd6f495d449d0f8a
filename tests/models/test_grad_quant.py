"""Every compressed linear kind gives its input the gradient of its de-quantized dense twin.

The twin is ``nn.Linear`` holding ``dense_weight()`` (the exact de-quantization) and the bias; a
frozen base must give ``x`` the twin's gradient and take none itself. Calls of 6 rows (which the
decode kernels would take at inference), of 320 rows (the fp32 de-quantized path) and bf16 calls
(torch's int8/int4 pack kernels) are all covered, as is keeping the C++ kernels out of training.

Run: ``.venv/bin/python -m pytest tests/models/test_grad_quant.py``
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from slimlm import kernels
from slimlm.lowrank.linear import LowRankLinear
from slimlm.quant.linear import (
    Int4WeightLinear,
    Int8OutlierLinear,
    Int8WeightLinear,
    IntxWeightLinear,
    NF4Linear,
    W8A8Linear,
)
from slimlm.quant.nf4 import quantize_nf4
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.sparsity.storage import SparseLinear


def _qw(out: int, inp: int, bits: int, group: int, symmetric: bool, act_order: bool = False) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(bits * 100 + out)
    ng = -(-inp // group)
    q = torch.randint(0, 2**bits, (out, inp), generator=gen).to(torch.uint8)
    scale = torch.rand(out, ng, generator=gen) * 0.02 + 0.001
    zero = (torch.full((out, ng), 2 ** (bits - 1), dtype=torch.int32) if symmetric
            else torch.randint(0, 2**bits, (out, ng), generator=gen).to(torch.int32))
    g_idx = (torch.argsort(torch.randperm(inp, generator=gen)) // group).to(torch.int32) if act_order else None
    return QuantizedWeight(q, scale, zero, bits, group, symmetric, g_idx)


def _bias(out: int) -> torch.Tensor:
    return torch.linspace(-0.5, 0.5, out)


def _outlier() -> nn.Module:
    qw = _qw(32, 64, 8, 64, True)
    cols = torch.tensor([3, 17, 40])
    return Int8OutlierLinear.from_quantized(qw, cols, torch.randn(32, 3) * 0.05, bias=_bias(32))


def _sparse(exec_mode: str, bits: int = 0) -> nn.Module:
    w = torch.randn(32, 64) * 0.05
    w[torch.rand(32, 64) < (0.97 if exec_mode == "csr" else 0.5)] = 0
    if bits:  # 2:4 with 4-bit codes
        w = torch.randn(32, 64) * 0.05
        g = w.reshape(32, 16, 4)
        g[..., 2:] = 0
        w = g.reshape(32, 64)
        scale = torch.full((32, 1), 0.01)
        zero = torch.full((32, 1), 8, dtype=torch.uint8)
        q = torch.clamp(torch.round(w / scale) + 8, 0, 15).to(torch.int64)
        w = torch.where(w != 0, (q - 8) * scale, torch.zeros_like(w))
        return SparseLinear.from_dense(w, _bias(32), pattern=(2, 4), codes=(q, scale, zero, 4, 64))
    return SparseLinear.from_dense(w, _bias(32), exec_mode=exec_mode)


def _lowrank() -> nn.Module:
    return LowRankLinear.from_factors(torch.randn(32, 8) * 0.1, torch.randn(8, 64) * 0.1, _bias(32))


KINDS: dict[str, Callable[[], nn.Module]] = {
    "int8_sym_channel": lambda: Int8WeightLinear.from_quantized(_qw(32, 64, 8, 64, True), bias=_bias(32)),
    "int8_asym_channel": lambda: Int8WeightLinear.from_quantized(_qw(32, 64, 8, 64, False)),
    "int8_grouped_act_order": lambda: Int8WeightLinear.from_quantized(_qw(32, 64, 8, 32, False, True)),
    "int4_kernel": lambda: Int4WeightLinear.from_quantized(_qw(32, 256, 4, 64, False), bias=_bias(32)),
    "int4_act_order": lambda: Int4WeightLinear.from_quantized(_qw(32, 128, 4, 32, False, True)),
    "int4_reference": lambda: Int4WeightLinear.from_quantized(_qw(20, 64, 4, 32, True)),
    "intx2": lambda: IntxWeightLinear.from_quantized(_qw(32, 64, 2, 32, False)),
    "intx3_act_order": lambda: IntxWeightLinear.from_quantized(_qw(16, 64, 3, 32, False, True)),
    "intx5": lambda: IntxWeightLinear.from_quantized(_qw(32, 64, 5, 32, True), bias=_bias(32)),
    "intx6": lambda: IntxWeightLinear.from_quantized(_qw(32, 64, 6, 64, False)),
    "intx7": lambda: IntxWeightLinear.from_quantized(_qw(32, 64, 7, 32, False)),
    "nf4_double": lambda: NF4Linear.from_quantized(quantize_nf4(torch.randn(32, 64) * 0.05, 64, True, 8),
                                                   bias=_bias(32)),
    "nf4_plain": lambda: NF4Linear.from_quantized(quantize_nf4(torch.randn(32, 64) * 0.05, 32, False)),
    "w8a8_sym": lambda: W8A8Linear.from_quantized(_qw(32, 64, 8, 64, True), bias=_bias(32)),
    "w8a8_asym": lambda: W8A8Linear.from_quantized(_qw(32, 64, 8, 64, False)),
    "int8_outlier": _outlier,
    "sparse_dense": lambda: _sparse("dense"),
    "sparse_csr": lambda: _sparse("csr"),
    "sparse_2of4_int4": lambda: _sparse("dense", bits=4),
    "lowrank": _lowrank,
}


def _twin(mod: nn.Module, dtype: torch.dtype) -> nn.Linear:
    w = mod.dense_weight()  # type: ignore[operator]
    b = getattr(mod, "bias", None)
    twin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        twin.weight.copy_(w)
        if b is not None:
            twin.bias.copy_(b)
    return twin.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [6, 320])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_input_gradient_equals_the_dequantized_twin(kind: str, rows: int, dtype: torch.dtype) -> None:
    mod = KINDS[kind]()
    mod.requires_grad_(False)  # a frozen base, as load_model leaves it
    before = {k: v.clone() for k, v in mod.state_dict().items()}
    twin = _twin(mod, dtype)
    torch.manual_seed(0)
    x = torch.randn(2, rows // 2, mod.in_features).to(dtype).requires_grad_()  # type: ignore[arg-type]
    gy = torch.randn(2, rows // 2, mod.out_features).to(dtype)  # type: ignore[arg-type]
    y = mod(x)
    assert y.dtype == dtype and y.requires_grad
    y.backward(gy)
    xt = x.detach().clone().requires_grad_()
    yt = twin(xt)
    yt.backward(gy)
    assert x.grad is not None and xt.grad is not None
    assert x.grad.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(x.grad, xt.grad, rtol=1e-5, atol=1e-6)
    else:  # one bf16 matmul each, possibly blocked differently
        torch.testing.assert_close(x.grad.float(), xt.grad.float(), rtol=2e-2, atol=2e-2 * xt.grad.float().abs().max().item())
    # forward keeps the module's own math (int8 activations for W8A8, bf16 kernels): close to the twin
    err = (y.float() - yt.float()).norm() / yt.float().norm()
    assert err < (0.05 if kind.startswith(("w8a8", "int8_outlier")) or dtype == torch.bfloat16 else 1e-2), float(err)
    for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
        assert t.grad is None, f"{kind}: {name} got a gradient"
    for k, v in mod.state_dict().items():
        assert torch.equal(v, before[k]), f"{kind}: {k} changed"


@pytest.mark.parametrize("kind", ["int8_sym_channel", "int4_kernel", "intx5", "nf4_double"])
def test_training_calls_stay_off_the_decode_kernels(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 1-row training call stays off the decode kernels (qgemv rounds activations to int8); the same
    call under inference_mode takes them. The exact de-quantization of the tile layout
    (``dequant_tiles``, the one runtime layout's reader, tested against reference math) may run."""
    if kernels.load() is None:
        pytest.skip(f"decode kernels unavailable: {kernels.status()}")
    mod = KINDS[kind]()
    calls: list[str] = []
    real = kernels._ext
    spy = type("Spy", (), {"__getattr__": lambda self, n: (calls.append(n), getattr(real, n))[1]})()
    monkeypatch.setattr(kernels, "_ext", spy)
    x = torch.randn(1, mod.in_features)  # type: ignore[arg-type]
    with torch.inference_mode():
        mod(x)
    assert calls, "inference call did not take the decode kernel"
    calls.clear()
    mod(x.clone().requires_grad_()).sum().backward()
    assert [c for c in calls if c != "dequant_tiles"] == []


def test_gradients_flow_through_a_quantized_layer_into_trainable_parameters() -> None:
    """A trainable layer before a frozen int4 base gets the gradient it would get with the dense twin
    (a loss linear in the output, so the gradient does not depend on the bf16-rounded forward)."""
    base = KINDS["int4_kernel"]()
    first = nn.Linear(16, base.in_features)  # type: ignore[arg-type]
    x = torch.randn(4, 16)
    c = torch.randn(4, base.out_features)  # type: ignore[arg-type]
    (base(first(x)) * c).sum().backward()
    g = first.weight.grad.clone()  # type: ignore[union-attr]
    first.zero_grad()
    (_twin(base, torch.float32)(first(x)) * c).sum().backward()
    torch.testing.assert_close(g, first.weight.grad, rtol=1e-5, atol=1e-6)
