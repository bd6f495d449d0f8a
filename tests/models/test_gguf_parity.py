"""Runtime on GGUF files (F32, Q8_0) written from tiny random models vs transformers loading the same GGUF."""

from __future__ import annotations

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.loaders.gguf_writer import write_gguf
from slimlm.loaders.hf import read_hf_folder
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer

FAMILIES = ["llama", "qwen2", "gemma3", "gpt2"]
# GGUF stores neither Gemma 3's query_pre_attn_scalar nor its layer pattern (llama.cpp fixes them:
# 256 and 5 sliding + 1 global), so the tiny Gemma 3 uses those values here.
GGUF_OVERRIDES = {
    "gemma3": dict(num_hidden_layers=6, query_pre_attn_scalar=256,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"]),
    "gpt2": dict(n_positions=1024),  # transformers' GGUF loader ignores gpt2.context_length
}


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = 1e-4 * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol, f"max diff {(a - b).abs().max().item():.3e} > {tol:.3e}"


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
@pytest.mark.parametrize("family", FAMILIES)
def test_gguf_logits_match_transformers(family, qtype, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = make_tiny_tokenizer(vocab_size=384)
    hf_dir = tmp_path / "hf"
    hf_model = make_hf_model(family, hf_dir, vocab_size=384, **GGUF_OVERRIDES.get(family, {}))
    tok.save(hf_dir)
    ckpt = read_hf_folder(hf_dir)
    gguf_path = tmp_path / "m.gguf"
    write_gguf(gguf_path, ckpt.config, ckpt.tensors, tok, default_type=qtype)

    ours = load_model(str(gguf_path))
    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("def main():\n    return some_function(1, 2, 3) + other_value")[:16]])
    with torch.no_grad():
        got, want = ours.model(ids), ref(ids).logits
    _close(got, want)
    if qtype == "F32":  # lossless: equals the original model too
        with torch.no_grad():
            _close(got, hf_model(ids).logits)
