"""Which GGUF type each tensor gets: plain types, and llama.cpp's Q4_K_M / Q5_K_M mixes.

Why: "Q4_K_M" is not one type but a rule (llama.cpp's ``llama_tensor_get_type``). A file that claims
Q4_K_M should hold what llama-quantize would have written, so its size and quality are what llama.cpp
users expect. The rule for a dense (non-MoE) model, no importance matrix:

- the output head, and the token embedding when it is tied to the head: Q6_K (Q8_0 when its rows are
  not whole 256-value blocks);
- ``attn_v`` and ``ffn_down`` of the layers where ``use_more_bits`` holds (the first and last eighth of
  the layers and every third one between): Q6_K;
- every other 2-D weight: the mix's base type (Q4_K for Q4_K_M, Q5_K for Q5_K_M);
- then, when a row is not whole 256-value blocks, the K type falls back as llama.cpp does: Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0 (SmolLM2's 576-wide rows take this path), and to F32 when a row is not
  whole 32-value blocks either;
- 1-D tensors and norms stay F32.

Example::

    tensor_type("blk.3.attn_v.weight", (576, 576), "Q4_K_M", n_layers=30, tied=True)  # 'Q8_0'

Tests: ``.venv/bin/pytest tests/loaders/test_gguf_kquants.py``.
"""

from __future__ import annotations

import re

from slimlm.utils.errors import ConfigError

# GGUF tensor types slimlm encodes (the 32-value ones via gguf.quants, the K-quants via gguf_kquants)
PLAIN_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
MIXES = {"Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}  # mix -> base type
WRITE_TYPES = PLAIN_TYPES + tuple(MIXES)
# general.file_type (llama.cpp's llama_ftype) per requested type; plain K types take the "_S" variant's id
FILE_TYPE = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K": 14, "Q4_K_M": 15,
             "Q5_K": 16, "Q5_K_M": 17, "Q6_K": 18, "BF16": 32}
BLOCK = {"Q8_0": 32, "Q4_0": 32, "Q4_1": 32, "Q5_0": 32, "Q5_1": 32, "Q4_K": 256, "Q5_K": 256, "Q6_K": 256}
K_FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}
_LAYER = re.compile(r"^blk\.(\d+)\.")


def check_write_type(type_name: str) -> str:
    if type_name not in WRITE_TYPES:
        raise ConfigError(f"GGUF type {type_name!r} cannot be written (choose one of {', '.join(WRITE_TYPES)})")
    return type_name


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's choice of the layers whose attn_v / ffn_down get more bits in the _M mixes."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fit_block(type_name: str, ncols: int) -> str:
    """``type_name``, or the type llama.cpp falls back to when a row of ``ncols`` values does not fit its blocks."""
    block = BLOCK.get(type_name)
    if block is None or ncols % block == 0:
        return type_name
    if type_name in K_FALLBACK:
        return fit_block(K_FALLBACK[type_name], ncols)
    return "F32"


def mix_type(gguf_name: str, mix: str, n_layers: int, tied: bool) -> str:
    """The type ``mix`` gives a 2-D weight before the block-size fallback."""
    base = MIXES[mix]
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
    if kind == "output" or (tied and kind == "token_embd"):
        return "Q6_K"
    m = _LAYER.match(gguf_name)
    if m and kind in ("attn_v", "ffn_down") and use_more_bits(int(m.group(1)), n_layers):
        return "Q6_K"
    return base


def tensor_type(gguf_name: str, shape: tuple[int, ...], requested: str, n_layers: int, tied: bool) -> str:
    """GGUF type of one tensor (HF shape ``[out, in]``) when the file's type is ``requested``."""
    if len(shape) < 2:
        return "F32"
    kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
    if requested in MIXES:
        wanted = mix_type(gguf_name, requested, n_layers, tied)
        if wanted == "Q6_K" and (kind == "output" or (tied and kind == "token_embd")) and shape[-1] % 256:
            return fit_block("Q8_0", int(shape[-1]))  # llama.cpp: such a head is Q8_0 (not Q6_K's fallback)
        return fit_block(wanted, int(shape[-1]))
    return fit_block(requested, int(shape[-1]))
