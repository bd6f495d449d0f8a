"""Tiny random Hugging Face models (the parity oracle), one per supported family."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY: dict[str, dict[str, Any]] = {
    "llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                  tie_word_embeddings=False),
    "llama_tied_rope_llama3": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1, vocab_size=256,
                                   max_position_embeddings=256, tie_word_embeddings=True,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    "llama_linear": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, vocab_size=256, max_position_embeddings=128,
                         rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama_dynamic": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=16,
                          rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "llama_yarn": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                       rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "mistral": dict(model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                    sliding_window=8),
    "qwen2": dict(model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                  tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=256,
                   max_position_embeddings=128, sliding_window=6, query_pre_attn_scalar=16,
                   layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=128),
    "opt": dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                vocab_size=256, max_position_embeddings=128, word_embed_proj_dim=64),
}


def make_hf_model(name: str, folder: Path, seed: int = 0, **overrides: Any):  # type: ignore[no-untyped-def]
    """Build a tiny random model with transformers' from_config, save it to ``folder``, return it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY[name])
    kw.update(overrides)
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():  # make norms non-trivial so parity catches norm bugs
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(folder)
    return model
