"""What every checkpoint loader returns: an HF-style config dict, HF-named float tensors, a tokenizer."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from slimlm.loaders.tokenizer import Tokenizer


@dataclass
class Checkpoint:
    """A checkpoint in interchange form.

    ``config`` is a Hugging Face ``config.json`` dict; ``tensors`` use Hugging Face parameter names
    (``model.layers.0.self_attn.q_proj.weight``); ``source`` says where it came from (for ``info``).
    """

    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: Tokenizer | None = None
    source: str = ""
    format: str = ""  # "hf", "gguf", "slimlm"
    file_bytes: int = 0  # size of the weight files on disk
    meta: dict[str, Any] = field(default_factory=dict)  # e.g. GGUF tensor types, slimlm.json
