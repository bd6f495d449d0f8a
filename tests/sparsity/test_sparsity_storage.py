"""SparseLinear storage: exact round trips for every layout, both run-time paths, checkpoint size."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm.models.modules import build_linear
from slimlm.sparsity.masks import mask_n_m, mask_per_row
from slimlm.sparsity.storage import SparseLinear, pack_bits, unpack_bits
from slimlm.utils.errors import ConfigError


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_roundtrip(bits: int) -> None:
    codes = torch.randint(0, 2**bits, (5, 37))
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape[-1] == -(-37 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, 37), codes)
    for row in range(5):  # the layout: code i at bit i * bits of a little-endian byte stream
        total = sum(int(v) << (i * bits) for i, v in enumerate(codes[row].tolist()))
        assert packed[row].tolist() == [(total >> (8 * k)) & 0xFF for k in range(packed.shape[-1])]


def _pruned(pattern: tuple[int, int] | None, out_f: int = 24, in_f: int = 64) -> torch.Tensor:
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(0))
    mask = mask_n_m(w.abs(), *pattern) if pattern else mask_per_row(w.abs(), 0.6)
    return w * mask


def _reload(mod: SparseLinear) -> SparseLinear:
    """create -> load_state_dict -> process_after_loading, as the loader does."""
    new = build_linear(mod.kind, mod.in_features, mod.out_features, mod.has_bias, mod.spec())
    new.load_state_dict(mod.state_dict())
    new.process_after_loading()
    assert isinstance(new, SparseLinear)
    return new


@pytest.mark.parametrize("pattern", [None, (2, 4), (4, 8), (1, 4)])
@pytest.mark.parametrize("exec_mode", ["dense", "csr"])
def test_exact_roundtrip_and_forward(pattern: tuple[int, int] | None, exec_mode: str) -> None:
    w = _pruned(pattern)
    bias = torch.randn(24)
    mod = _reload(SparseLinear.from_dense(w, bias, pattern, exec_mode=exec_mode))
    assert torch.equal(mod.dense_weight(), w)
    assert mod.path == exec_mode
    x = torch.randn(2, 5, 64)
    assert torch.allclose(mod(x), F.linear(x, w, bias), atol=1e-5)
    assert torch.allclose(mod(x.bfloat16()).float(), F.linear(x, w, bias), atol=0.15)


def test_checkpoint_is_smaller_than_dense() -> None:
    for pattern in (None, (2, 4)):
        w = _pruned(pattern, 64, 256)
        mod = SparseLinear.from_dense(w, None, pattern)
        stored = sum(t.numel() * t.element_size() for t in mod.state_dict().values())
        dense = w.numel() * w.element_size()
        assert stored < 0.6 * dense  # values (<= 50%) + 1 or 2 bits of position per weight


def test_quantized_values_roundtrip() -> None:
    w = _pruned((2, 4))
    scales = torch.rand(24, 2) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (24, 2))
    g = torch.arange(64) // 32
    q = torch.randint(0, 16, (24, 64))
    keep = w != 0
    w_q = ((q - zeros[:, g]) * scales[:, g]) * keep
    mod = _reload(SparseLinear.from_dense(w_q, None, (2, 4), codes=(q, scales, zeros, 4, 32)))
    assert torch.allclose(mod.dense_weight(), w_q, atol=1e-6)
    assert mod.qvalues.numel() == 24 * 32 // 2  # 4-bit codes of the kept half, two per byte


def test_auto_path_uses_csr_only_at_high_sparsity() -> None:
    w = torch.randn(32, 64)
    assert SparseLinear.from_dense(w * mask_per_row(w.abs(), 0.5), None).path == "dense"
    assert SparseLinear.from_dense(w * mask_per_row(w.abs(), 0.97), None).path == "csr"


def test_pattern_violation_is_an_error() -> None:
    with pytest.raises(ConfigError):
        SparseLinear.from_dense(torch.randn(4, 8), None, (2, 4))


@pytest.mark.parametrize("exec_mode", ["dense", "csr"])
def test_decode_kernels_run_the_dense_runtime_weight(exec_mode: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A sparse model below the CSR threshold keeps a dense weight at run time: the decode kernels
    (one-row GEMV, the decoder layer's one-call plan) must run it like a plain linear's, with the
    same result as ``F.linear`` on the pruned weight; the CSR path offers them nothing."""
    from slimlm import kernels
    from slimlm.loaders import load_model
    from tests.helpers.models import make_hf_model

    w, bias = _pruned((2, 4)), torch.randn(24)
    mod = _reload(SparseLinear.from_dense(w, bias, (2, 4), exec_mode=exec_mode))
    spec = kernels.linear_spec(mod)
    if exec_mode == "csr" or not kernels.supported()[0]:
        assert spec is None
        return
    assert spec is not None and spec[0] is mod._dense
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), F.linear(x, w, bias), rtol=1e-5, atol=1e-5)  # the GEMV kernel
    make_hf_model("llama", tmp_path / "m")
    layer = load_model(str(tmp_path / "m")).model.model.layers[0]
    for parent, name in ((layer.self_attn, "o_proj"), (layer.mlp, "down_proj")):
        lin = getattr(parent, name)
        wp = lin.weight.detach() * mask_n_m(lin.weight.detach().abs(), 2, 4)
        setattr(parent, name, SparseLinear.from_dense(wp, None, (2, 4), exec_mode=exec_mode))
    assert layer._make_plan() is not None  # the whole layer still decodes in one kernel call
