"""Export formats, each verified by an outside reader: compressed-tensors decompresses ours, an
independent GPTQ unpack written here, ``gguf.quants.dequantize`` for GGUF blocks.

Run: ``.venv/bin/pytest tests/quant/test_export.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from slimlm.quant.export import (
    ExportParts,
    export_compressed_tensors,
    export_gptq,
    gguf_blocks,
    pack_exact,
    split_model,
)
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import SlimlmError


def make_qw(out: int, inp: int, bits: int, group: int, sym: bool, seed: int = 0,
            f16_scales: bool = False) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    ng = -(-inp // group)
    q = torch.randint(0, 2**bits, (out, inp), generator=gen).to(torch.uint8)
    scale = torch.rand(out, ng, generator=gen) * 0.05 + 0.001
    if f16_scales:
        scale = scale.half().float()
    zero = (torch.full((out, ng), 2 ** (bits - 1)) if sym else torch.randint(1, 2**bits, (out, ng), generator=gen))
    return QuantizedWeight(q, scale, zero.to(torch.int32), bits, group, sym)


def parts_for(quantized: dict[str, QuantizedWeight]) -> ExportParts:
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64}
    tensors = {"model.embed_tokens.weight": torch.randn(10, 64), "model.norm.weight": torch.randn(64),
               "lm_head.weight": torch.randn(10, 64)}
    biases = {name: torch.randn(qw.shape[0]) for name, qw in list(quantized.items())[:1]}
    return ExportParts(config, quantized, tensors, biases)


CT_CASES = {
    "model.layers.0.self_attn.q_proj": make_qw(32, 64, 4, 32, False, 1),
    "model.layers.0.self_attn.k_proj": make_qw(16, 96, 4, 64, False, 2),  # ragged: 96 = 64 + 32
    "model.layers.0.mlp.up_proj": make_qw(24, 64, 4, 64, True, 3),  # per channel (one group)
    "model.layers.0.mlp.down_proj": make_qw(20, 48, 8, 16, False, 4),
    "model.layers.1.mlp.up_proj": make_qw(24, 64, 3, 16, False, 5),
    "model.layers.1.mlp.gate_proj": make_qw(24, 64, 2, 32, True, 6),
}


def test_compressed_tensors_decompresses_to_our_weights(tmp_path: Path) -> None:
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    parts = parts_for(CT_CASES)
    out = export_compressed_tensors(parts, tmp_path / "ct")
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    qc = QuantizationConfig.model_validate(cfg)  # the package accepts our config
    assert qc.format == "pack-quantized" and qc.quant_method == "compressed-tensors"
    assert "lm_head" in cfg["ignore"]
    sd = load_file(str(out / "model.safetensors"))
    seen = set()
    for scheme in qc.config_groups.values():
        for name in scheme.targets:
            qw = CT_CASES[name]
            local = {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")}
            assert local["weight_packed"].dtype == torch.int32
            assert local["weight_packed"].shape == (qw.shape[0], -(-qw.shape[1] * qw.bits // 32))
            dec = PackedQuantizationCompressor.decompress(local, scheme)
            assert torch.equal(dec["weight"], qw.dequantize()), name
            seen.add(name)
    assert seen == set(CT_CASES)
    first = next(iter(parts.biases))
    assert torch.equal(sd[first + ".bias"], parts.biases[first])
    for k, v in parts.tensors.items():
        assert torch.equal(sd[k], v)


def test_compressed_tensors_refuses_permuted_g_idx_and_existing_output(tmp_path: Path) -> None:
    qw = make_qw(16, 64, 4, 32, False)
    qw.g_idx = (torch.arange(64) % 2).to(torch.int32)
    with pytest.raises(SlimlmError, match="static groups"):
        export_compressed_tensors(parts_for({"model.layers.0.self_attn.q_proj": qw}), tmp_path / "a")
    export_compressed_tensors(parts_for({"model.layers.0.self_attn.q_proj": make_qw(16, 64, 4, 32, False)}), tmp_path / "b")
    with pytest.raises(SlimlmError):
        export_compressed_tensors(parts_for({"model.layers.0.self_attn.q_proj": make_qw(16, 64, 4, 32, False)}), tmp_path / "b")


# --- GPTQ -----------------------------------------------------------------------------------------
def independent_gptq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                            bits: int, inp: int, v1: bool) -> torch.Tensor:
    """Plain-Python reading of a GPTQ linear: each column of qweight is one bit stream of input rows."""
    words = [[w & 0xFFFFFFFF for w in col] for col in qweight.t().tolist()]  # [out][n_words]
    zwords = [[w & 0xFFFFFFFF for w in row] for row in qzeros.tolist()]  # [G][n_words]
    out = len(words)
    mask = (1 << bits) - 1

    def stream_get(ws: list[int], i: int) -> int:
        total = sum(w << (32 * k) for k, w in enumerate(ws))
        return (total >> (i * bits)) & mask

    w = torch.empty(out, inp, dtype=torch.float32)
    for o in range(out):
        for i in range(inp):
            g = int(g_idx[i])
            z = stream_get(zwords[g], o) + (1 if v1 else 0)
            w[o, i] = (stream_get(words[o], i) - z) * float(scales[g, o])
    return w


@pytest.mark.parametrize("bits,group,sym,fmt", [(4, 32, False, "gptq"), (4, 32, True, "gptq"),
                                                (3, 16, False, "gptq"), (2, 32, False, "gptq_v2"),
                                                (8, 24, False, "gptq")])
def test_gptq_layout_by_independent_unpack(bits: int, group: int, sym: bool, fmt: str, tmp_path: Path) -> None:
    qw = make_qw(12, 40, bits, group, sym, seed=bits, f16_scales=True)  # ragged when 40 % group != 0
    out = export_gptq(parts_for({"model.layers.0.mlp.down_proj": qw}), tmp_path / "g", checkpoint_format=fmt)
    qcfg = json.loads((out / "quantize_config.json").read_text())
    assert qcfg["bits"] == bits and qcfg["sym"] == sym and qcfg["checkpoint_format"] == fmt
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"
    sd = load_file(str(out / "model.safetensors"))
    p = "model.layers.0.mlp.down_proj."
    ng = -(-40 // group)
    assert sd[p + "qweight"].shape == (-(-40 * bits // 32), 12) and sd[p + "qweight"].dtype == torch.int32
    assert sd[p + "qzeros"].shape == (ng, -(-12 * bits // 32)) and sd[p + "scales"].dtype == torch.float16
    assert torch.equal(sd[p + "g_idx"], (torch.arange(40) // group).int())
    w = independent_gptq_unpack(sd[p + "qweight"], sd[p + "qzeros"], sd[p + "scales"], sd[p + "g_idx"], bits, 40,
                                v1=fmt == "gptq")
    assert torch.equal(w, qw.dequantize())


def test_gptq_v1_refuses_zero_point_zero_and_mixed_settings(tmp_path: Path) -> None:
    qw = make_qw(8, 32, 4, 32, False)
    qw.zero[0, 0] = 0
    with pytest.raises(SlimlmError, match="gptq_v2"):
        export_gptq(parts_for({"a.q_proj": qw}), tmp_path / "a")
    with pytest.raises(SlimlmError, match="one bits"):
        export_gptq(parts_for({"a.q_proj": make_qw(8, 32, 4, 32, False), "a.k_proj": make_qw(8, 32, 8, 32, False)}),
                    tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --- GGUF -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits,sym,qtype", [(8, True, gguf.GGMLQuantizationType.Q8_0),
                                            (4, True, gguf.GGMLQuantizationType.Q4_0),
                                            (4, False, gguf.GGMLQuantizationType.Q4_1)])
def test_gguf_exact_blocks_read_back(bits: int, sym: bool, qtype: gguf.GGMLQuantizationType) -> None:
    qw = make_qw(6, 96, bits, 32, sym, seed=bits, f16_scales=True)
    blocks, t, exact = gguf_blocks(qw)
    assert t == qtype and exact
    assert blocks.shape == (6, 3 * gguf.GGML_QUANT_SIZES[qtype][1])
    back = torch.from_numpy(gguf.quants.dequantize(blocks, qtype).astype(np.float32))
    ref = qw.dequantize()
    if qtype == gguf.GGMLQuantizationType.Q4_1:  # w = q*d + m with m = -zero*d rounded to float16
        g = torch.arange(96) // 32
        m = (-qw.zero.float() * qw.scale).half().float()
        ref = qw.qweight.float() * qw.scale[:, g] + m[:, g]
    assert torch.equal(back, ref)


def test_gguf_q4_0_nibble_order() -> None:
    q = torch.arange(32, dtype=torch.uint8).remainder(16).reshape(1, 32)
    qw = QuantizedWeight(q, torch.ones(1, 1), torch.full((1, 1), 8, dtype=torch.int32), 4, 32, True)
    b = pack_exact(qw, gguf.GGMLQuantizationType.Q4_0)[0]
    assert b[:2].view(np.float16)[0] == 1.0
    assert list(b[2:]) == [(j % 16) | ((j + 16) % 16) << 4 for j in range(16)]


def test_gguf_fallback_requantizes() -> None:
    qw = make_qw(4, 64, 3, 16, False)
    blocks, t, exact = gguf_blocks(qw, gguf.GGMLQuantizationType.Q8_0)
    assert t == gguf.GGMLQuantizationType.Q8_0 and not exact
    back = torch.from_numpy(gguf.quants.dequantize(blocks, t).astype(np.float32))
    ref = qw.dequantize()
    assert (back - ref).abs().max() <= ref.abs().amax(dim=1, keepdim=True).max() / 127


# --- from a real (tiny) slimlm model --------------------------------------------------------------
def test_split_model_and_gguf_glue_on_tiny_llama(tmp_path: Path) -> None:
    from slimlm.loaders import load_model
    from slimlm.quant import RTNConfig, quantize_
    from slimlm.quant.export import export_gguf_quantized
    from tests.helpers.models import make_hf_model

    make_hf_model("llama", tmp_path / "hf")
    lm = load_model(str(tmp_path / "hf"))
    quantize_(lm.model, RTNConfig(bits=4, group_size=32, symmetric=True))
    parts = split_model(lm.model)
    q_name = "model.layers.0.self_attn.q_proj"
    assert q_name in parts.quantized and "model.norm.weight" in parts.tensors
    assert not any(".qweight" in k for k in parts.tensors)
    mod = lm.model.get_submodule(q_name)
    assert torch.equal(parts.quantized[q_name].dequantize(), mod.dense_weight())

    written = export_gguf_quantized(lm, tmp_path / "m.gguf")
    assert written["model.layers.1.mlp.down_proj.weight"] == "Q4_0"
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    back = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32))
    down = lm.model.get_submodule("model.layers.1.mlp.down_proj").to_quantized()
    g = torch.arange(down.shape[1]) // 32
    ref = (down.qweight.float() - 8) * down.scale.half().float()[:, g]  # float16 block scales
    assert torch.equal(back.reshape(ref.shape), ref)


def test_quantized_head_of_a_tied_model_is_exported_untied(tmp_path: Path) -> None:
    """HF readers tie lm_head to the embedding when config.json says so: a quantized head must say it is not."""
    from slimlm.loaders import load_model
    from slimlm.quant import RTNConfig, quantize_
    from tests.helpers.models import make_hf_model

    make_hf_model("llama_tied_rope_llama3", tmp_path / "hf")
    for ignore, tied in ((["lm_head"], True), ([], False)):
        lm = load_model(str(tmp_path / "hf"))
        quantize_(lm.model, RTNConfig(bits=4, group_size=32, ignore=ignore))
        parts = split_model(lm.model)
        assert parts.config["tie_word_embeddings"] is tied
        assert ("lm_head" in parts.quantized) is not tied and "lm_head.weight" not in parts.tensors
        out = export_compressed_tensors(parts, tmp_path / f"ct{int(tied)}")
        assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is tied


# --- formats that cannot hold a method's output: one line at export time, exit 2 -------------------
def _swap(lm, path: str, module) -> None:  # type: ignore[no-untyped-def]
    lm.model.set_submodule(path, module)


def _nf4(lm) -> None:  # type: ignore[no-untyped-def]
    from slimlm.quant import quantize_
    from slimlm.quant.methods.nf4 import NF4Config

    quantize_(lm.model, NF4Config())


def _w8a8(lm) -> None:  # type: ignore[no-untyped-def]
    from slimlm.quant.linear import W8A8Linear
    from slimlm.quant.primitives import quantize_weight

    w = lm.model.get_submodule("model.layers.0.mlp.down_proj").weight
    _swap(lm, "model.layers.0.mlp.down_proj", W8A8Linear.from_quantized(quantize_weight(w, 8, -1, True)))


def _sparse(lm) -> None:  # type: ignore[no-untyped-def]
    from slimlm.sparsity.storage import SparseLinear

    w = lm.model.get_submodule("model.layers.1.mlp.up_proj").weight.detach().clone()
    w[w.abs() < w.abs().median()] = 0
    _swap(lm, "model.layers.1.mlp.up_proj", SparseLinear.from_dense(w, None))


def _lowrank(lm) -> None:  # type: ignore[no-untyped-def]
    from slimlm.lowrank.linear import LowRankLinear

    w = lm.model.get_submodule("model.layers.0.self_attn.o_proj").weight.detach()
    u, s, vh = torch.linalg.svd(w)
    _swap(lm, "model.layers.0.self_attn.o_proj", LowRankLinear.from_factors(u[:, :8] * s[:8], vh[:8], None))


def _mixed_bits(lm) -> None:  # type: ignore[no-untyped-def]
    from slimlm.quant import RTNConfig, quantize_
    from slimlm.quant.methods.base import weight_module
    from slimlm.quant.primitives import quantize_weight

    lin = lm.model.get_submodule("model.layers.0.mlp.down_proj")
    quantize_(lm.model, RTNConfig(bits=4, group_size=32, ignore=["lm_head", "model.layers.0.mlp.down_proj"]))
    _swap(lm, "model.layers.0.mlp.down_proj", weight_module(lin, quantize_weight(lin.weight, 8, 32)))


@pytest.mark.parametrize("make,target,message", [
    (_nf4, "compressed-tensors", "compressed-tensors cannot hold nf4 linears"),
    (_nf4, "gptq", "GPTQ cannot hold nf4 linears"),
    (_w8a8, "compressed-tensors", "cannot hold w8a8 linears (model.layers.0.mlp.down_proj)"),
    (_w8a8, "gptq", "cannot hold w8a8 linears"),
    (_sparse, "compressed-tensors", "cannot hold sparse linears (model.layers.1.mlp.up_proj)"),
    (_sparse, "gptq", "cannot hold sparse linears"),
    (_lowrank, "compressed-tensors", "cannot hold lowrank linears (model.layers.0.self_attn.o_proj)"),
    (_lowrank, "gptq", "cannot hold lowrank linears"),
    (_mixed_bits, "gptq", "this model has 4/8 bits"),
])
def test_export_refuses_what_the_format_cannot_hold(make, target: str, message: str, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from slimlm.cli.main import main
    from slimlm.loaders import load_model
    from slimlm.loaders.save import save_model
    from tests.helpers.models import make_hf_model

    make_hf_model("llama", tmp_path / "hf")
    lm = load_model(str(tmp_path / "hf"))
    make(lm)
    save_model(lm, tmp_path / "model")
    capsys.readouterr()
    code = main(["export", str(tmp_path / "model"), "--to", target, str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()
