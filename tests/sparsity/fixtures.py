"""Shared fixtures for the pruning / low-rank tests: a tiny random llama folder with a tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer


def tiny_llama(folder: Path, **overrides: object) -> Path:
    """transformers ``from_config`` tiny llama (hidden 64) + tiny BPE tokenizer saved to ``folder``."""
    kw: dict[str, object] = dict(vocab_size=384, num_hidden_layers=3, intermediate_size=128)
    kw.update(overrides)
    make_hf_model("llama", folder, **kw)
    make_tiny_tokenizer(384).save(folder)
    return folder


def samples(n: int = 4, t: int = 32, vocab: int = 384, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (t,), generator=g) for _ in range(n)]


def probe(vocab: int = 384) -> torch.Tensor:
    return torch.randint(3, vocab, (1, 20), generator=torch.Generator().manual_seed(1))


def calib_text_file(folder: Path) -> Path:
    from pydoc_data.topics import topics

    p = folder / "calib.txt"
    p.write_text("\n\n".join(topics[k] for k in sorted(topics)[:40]))
    return p
