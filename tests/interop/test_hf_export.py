"""``export --to hf`` read back by ``transformers.AutoModelForCausalLM``: the same logits as slimlm.

Tolerance 1e-4 of the logits' range: both sides run fp32 math on the same weights (a quantized linear is
expanded to its exact ``dense_weight()``); only the order of floating-point sums differs.
Run: ``.venv/bin/pytest tests/interop/test_hf_export.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from slimlm.loaders.save import export_hf
from slimlm.quant import RTNConfig, quantize_
from tests.interop.common import exact_logits, hf_logits, max_rel_diff, prompt, tiny_lm

TOL = 1e-4


def test_dense_export_loads_in_transformers_with_same_logits(tmp_path: Path) -> None:
    lm = tiny_lm(tmp_path, "qwen2")  # q/k/v biases, tied embeddings
    out = export_hf(lm, tmp_path / "out")
    ids = prompt()
    with torch.no_grad():
        ref = lm.model(ids).float()
    assert max_rel_diff(hf_logits(out, ids), ref) <= TOL


def test_quantized_tied_lm_head_survives_hf_export(tmp_path: Path) -> None:
    """A tied model whose lm_head was quantized: the export holds that head (de-quantized) and says
    ``tie_word_embeddings: false``; otherwise transformers re-ties the head to the dense embedding."""
    lm = tiny_lm(tmp_path, "llama_tied_rope_llama3")
    assert lm.config.tie_word_embeddings
    quantize_(lm.model, RTNConfig(bits=4, group_size=32, ignore=[]))  # lm_head quantized too
    out = export_hf(lm, tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    sd = load_file(str(out / "model.safetensors"))
    assert torch.equal(sd["lm_head.weight"], lm.model.lm_head.dense_weight())
    ids = prompt()
    ref = exact_logits(lm.model, ids)
    assert max_rel_diff(hf_logits(out, ids), ref) <= TOL
