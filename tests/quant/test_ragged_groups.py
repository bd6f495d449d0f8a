"""A group size that does not divide a row leaves a shorter last group (issue 17 item 2): the default of
every integer weight method, checked against per-group quantization computed here slice by slice (as
the GPTQ reference code slices ``W[:, i:i+g]``), through the storage modules and the CLI.

Run: ``.venv/bin/python -m pytest tests/quant/test_ragged_groups.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from slimlm.cli.main import main
from slimlm.loaders import load_model
from slimlm.quant import AWQConfig, GPTQConfig, RTNConfig, quantize_
from slimlm.quant.primitives import resolve_group_size
from slimlm.utils.errors import ConfigError
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer


def ref_dequant(w: torch.Tensor, bits: int, g: int, symmetric: bool) -> torch.Tensor:
    """Per-slice min/max (or absmax) grid containing 0, quantize, de-quantize: ``w: [out, in]``."""
    qmax = 2**bits - 1
    out = torch.empty_like(w)
    for a in range(0, w.shape[1], g):
        x = w[:, a : a + g]  # the last slice is shorter
        lo = torch.clamp(x.amin(1, keepdim=True), max=0.0)
        hi = torch.clamp(x.amax(1, keepdim=True), min=0.0)
        if symmetric:
            am = torch.maximum(-lo, hi)
            am = torch.where(am == 0, torch.ones_like(am), am)
            scale, zero = am / (qmax / 2), torch.full_like(am, 2 ** (bits - 1))
        else:
            both = (lo == 0) & (hi == 0)
            lo, hi = torch.where(both, -1.0, lo), torch.where(both, 1.0, hi)
            scale = (hi - lo) / qmax
            zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, qmax)
        out[:, a : a + g] = (q - zero) * scale
    return out


class Two(nn.Module):
    def __init__(self, inp: int) -> None:
        super().__init__()
        self.a = nn.Linear(inp, 48)
        self.b = nn.Linear(inp, 32, bias=False)


@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, False), (8, True), (4, True), (6, False)])
def test_rtn_default_is_ragged_and_exact(bits: int, symmetric: bool) -> None:
    torch.manual_seed(bits)
    m = Two(576)  # SmolLM2's row length: 4 x 128 + 64
    w = {n: getattr(m, n).weight.detach().clone() for n in ("a", "b")}
    quantize_(m, RTNConfig(bits=bits, group_size=128, symmetric=symmetric, ignore=[]))
    for n in ("a", "b"):
        mod = getattr(m, n)
        assert mod.scale.shape == (mod.out_features, 5)  # ceil(576 / 128) groups
        ref = ref_dequant(w[n], bits, 128, symmetric)
        assert torch.equal(mod.dense_weight(), ref)
        # every execution path of the module (decode kernel, fp32 large-call GEMM, bf16 path) on the
        # same de-quantized weight; decode rounds activations to int8 per chunk (docs/runtime.md)
        for rows, dtype, tol in ((1, torch.float32, 2e-2), (300, torch.float32, 1e-5), (5, torch.bfloat16, 3e-2)):
            x = torch.randn(rows, 576)
            want = x @ ref.t() + (mod.bias if mod.bias is not None else 0)
            got = mod(x.to(dtype)).float()
            assert (got - want).abs().max() <= tol * want.abs().max(), (n, rows, dtype)


def test_legacy_ragged_key_is_accepted() -> None:
    cfg = GPTQConfig.from_dict({"bits": 4, "group_size": 128, "ragged_last_group": True,
                                "overrides": {"lm_head": {"bits": 8, "ragged_last_group": False}}})
    assert cfg.group_size == 128 and "ragged_last_group" not in cfg.to_dict()


def test_whole_group_consumer_names_reason_and_fix() -> None:
    assert resolve_group_size(576, 128) == 128
    with pytest.raises(ConfigError, match=r"576 of x: this format cannot hold a shorter last group; .*dividing 576"):
        resolve_group_size(576, 128, "x", ragged=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ragged")
    make_hf_model("llama", d, vocab_size=384, max_position_embeddings=64)  # rows of 64 and 128
    make_tiny_tokenizer(vocab_size=384).save(d)
    return d


def test_calibrated_methods_take_ragged_groups(tiny: Path) -> None:
    lm = load_model(str(tiny))
    samples = [torch.randint(0, 384, (32,)) for _ in range(4)]
    for cfg in (GPTQConfig(group_size=48, act_order=False, calib_dtype="fp32"), AWQConfig(group_size=48)):
        lm = load_model(str(tiny))
        quantize_(lm.model, cfg, samples)
        down = lm.model.model.layers[0].mlp.down_proj  # 128 = 2 x 48 + 32
        assert down.scale.shape == (64, 3)


def test_cli_gptq_g48_on_64_wide_rows(tiny: Path, tmp_path: Path) -> None:
    calib = tmp_path / "c.txt"
    calib.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    code = main(["quantize", str(tiny), "--method", "gptq", "--bits", "4", "--group-size", "48",
                 "--calib", str(calib), "--calib-samples", "4", "--calib-seq-len", "32",
                 "--out", str(tmp_path / "q"), "--no-progress", "--json"])
    assert code == 0 and (tmp_path / "q" / "model.safetensors").is_file()
