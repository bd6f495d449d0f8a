"""Calibration and evaluation text: loading, and the reference sampling protocol.

Reference protocol (GPTQ/SparseGPT/Wanda code): tokenize the whole calibration text once (no special
tokens), ``random.seed(seed)``, then ``n_samples`` times ``i = random.randint(0, T - seq_len - 1)``
and take ``ids[i:i+seq_len]``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from slimlm.utils.errors import SlimlmError

WIKITEXT_CALIB_OFFSET = 400_000  # shared/data/wikitext-2-raw/README.md: calibrate from this character on


def default_text() -> str:
    """Python's own documentation: text on every machine (fine for demos, out of domain for WikiText)."""
    from pydoc_data import topics

    return "\n\n".join(topics.topics.values())


def read_text(path: str | Path | None, start_char: int = 0) -> str:
    """Read a UTF-8 text file (``None`` -> :func:`default_text`), from ``start_char`` on."""
    if path is None:
        text = default_text()
    else:
        p = Path(path)
        if not p.is_file():
            raise SlimlmError(f"text file not found: {p}")
        text = p.read_text(encoding="utf-8", errors="replace")
    if start_char:
        if start_char >= len(text):
            raise SlimlmError(f"{path}: start offset {start_char} is past the end of the text ({len(text)} characters)")
        text = text[start_char:]
    return text


def calibration_samples(tokenizer, text: str, n_samples: int = 128, seq_len: int = 512,  # type: ignore[no-untyped-def]
                        seed: int = 0) -> list[torch.Tensor]:
    """``n_samples`` random windows ``[seq_len]`` of the tokenized text (reference protocol)."""
    ids = tokenizer.encode(text)
    if len(ids) < seq_len + 2:
        raise SlimlmError(
            f"calibration text has {len(ids)} tokens, fewer than one window of {seq_len} (+2); use more text or a shorter --calib-seq-len"
        )
    rng = random.Random(seed)
    t = torch.tensor(ids, dtype=torch.long)
    out = []
    for _ in range(n_samples):
        i = rng.randint(0, len(ids) - seq_len - 1)
        out.append(t[i : i + seq_len].clone())
    return out
