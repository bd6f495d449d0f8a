"""Tiny runtime models and a fixed synthetic language for the distillation tests.

The models are built on the runtime directly (no transformers import: its model classes take ~10 s
to import on a loaded 2-core machine) with GPT-style init (N(0, 0.02), norms 1) and saved as slimlm
folders, so ``load_model`` / ``build_student`` read them as any model. The language is a sparse
first-order Markov chain (each token has ``k`` successors), so a trained teacher's next-token
distributions carry information that a one-hot label does not.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from slimlm.loaders.save import save_model
from slimlm.models.config import ModelConfig
from slimlm.models.transformer import Transformer
from slimlm.train.data import Example


def hf_config(vocab: int = 64, hidden: int = 64, layers: int = 4, **kw: Any) -> dict[str, Any]:
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden,
               intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=vocab, max_position_embeddings=128, rms_norm_eps=1e-6, tie_word_embeddings=False)
    cfg.update(kw)
    return cfg


def make_model(folder: Path, seed: int = 0, tokenizer: Any = None, **kw: Any) -> Path:
    """A randomly initialized runtime model saved as a slimlm folder at ``folder``."""
    model = Transformer(ModelConfig.from_hf(hf_config(**kw)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.ones_like(p) if "norm" in name else torch.randn(p.shape, generator=g) * 0.02)
    model.requires_grad_(False)
    return save(model, folder, tokenizer)


def save(model: Transformer, folder: Path, tokenizer: Any = None) -> Path:
    lm = SimpleNamespace(model=model, tokenizer=tokenizer, checkpoint=SimpleNamespace(source="tests"))
    return save_model(lm, folder, overwrite=True)


def chain(vocab: int = 64, k: int = 4, seed: int = 0) -> torch.Tensor:
    """Transition matrix [V, V]: each row has ``k`` non-zero successors."""
    g = torch.Generator().manual_seed(seed)
    p = torch.zeros(vocab, vocab)
    for a in range(vocab):
        nxt = torch.randperm(vocab, generator=g)[:k]
        w = torch.rand(k, generator=g) + 0.2
        p[a, nxt] = w / w.sum()
    return p


def sample(p: torch.Tensor, n: int, length: int, seed: int) -> list[Example]:
    """``n`` sequences of ``length`` tokens from the chain, every token a target."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = [int(torch.randint(p.shape[0], (1,), generator=g))]
        for _ in range(length - 1):
            x.append(int(torch.multinomial(p[x[-1]], 1, generator=g)))
        out.append(Example(x, list(x)))
    return out
