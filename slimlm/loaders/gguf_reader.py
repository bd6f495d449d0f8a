"""Read a GGUF file (llama.cpp's format) into a `Checkpoint`: HF config, HF-named float32 tensors, tokenizer.

Why: GGUF is how most small models are shipped for CPU inference. slimlm's runtime and compression
methods work on Hugging Face names and float weights, so this reader does what transformers does when
it loads a GGUF (``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)``): map the metadata
to a ``config.json`` dict, rename ``blk.N.attn_q.weight`` to ``model.layers.N.self_attn.q_proj.weight``,
de-quantize every tensor to float32 (``gguf.quants.dequantize``), undo llama.cpp's Q/K row permutation
for the llama architecture, and rebuild the tokenizer from ``tokenizer.ggml.*`` metadata.
The file is memory-mapped and its header parsed here (`GGUFFile`, ~50x faster than ``gguf.GGUFReader``
on a 49k-token vocabulary); only de-quantized tensors are materialized.

Example:
    ckpt = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt.config["num_hidden_layers"], ckpt.tensors["model.norm.weight"].shape, ckpt.tokenizer

Tests: ``.venv/bin/pytest tests/loaders/test_gguf.py`` (transformers' own GGUF loader is the oracle).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slimlm.loaders.tokenizer import Tokenizer
from slimlm.loaders.types import Checkpoint
from slimlm.utils.errors import CheckpointError

# --------------------------------------------------------------------------------------------- names
# GGUF architecture -> (HF architectures[0], HF model_type)
HF_ARCHS: dict[str, tuple[str, str]] = {
    "llama": ("LlamaForCausalLM", "llama"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text"),
    "gpt2": ("GPT2LMHeadModel", "gpt2"),
}
SUPPORTED_ARCHS = tuple(HF_ARCHS)

# per-layer GGUF tensor base name -> HF module path inside a layer
_LLAMA_LAYER = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GEMMA3_LAYER = {
    **_LLAMA_LAYER, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_GPT2_LAYER = {
    "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
}
_DECODER_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GPT2_GLOBAL = {"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                "output_norm": "transformer.ln_f", "output": "lm_head"}


@dataclass(frozen=True)
class ArchNames:
    layer_prefix: str  # "model.layers.{}." / "transformer.h.{}."
    layer: dict[str, str]
    globals: dict[str, str]


ARCH_NAMES: dict[str, ArchNames] = {
    "llama": ArchNames("model.layers.{}.", _LLAMA_LAYER, _DECODER_GLOBAL),
    "qwen2": ArchNames("model.layers.{}.", _LLAMA_LAYER, _DECODER_GLOBAL),
    "gemma3": ArchNames("model.layers.{}.", _GEMMA3_LAYER, _DECODER_GLOBAL),
    "gpt2": ArchNames("transformer.h.{}.", _GPT2_LAYER, _GPT2_GLOBAL),
}
# GPT-2 stores these as Conv1D ([in, out]); GGUF holds them as [out, in] like every other linear.
GPT2_CONV1D = ("attn_qkv", "attn_output", "ffn_up", "ffn_down")
IGNORED_TENSORS = ("rope_freqs",)  # derived from the config by llama.cpp, not a weight


def gguf_to_hf_name(arch: str, name: str) -> str | None:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (None when unknown)."""
    names = ARCH_NAMES[arch]
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) >= 4 and parts[1].isdigit():
        module = names.layer.get(parts[2])
        if module is None:
            return None
        return names.layer_prefix.format(int(parts[1])) + module + "." + ".".join(parts[3:])
    module = names.globals.get(parts[0])
    if module is None or len(parts) < 2:
        return None
    return module + "." + ".".join(parts[1:])


def hf_to_gguf_name(arch: str, name: str) -> str | None:
    """Inverse of `gguf_to_hf_name`."""
    names = ARCH_NAMES[arch]
    prefix = names.layer_prefix.split("{}")[0]
    if name.startswith(prefix):
        idx, _, rest = name[len(prefix):].partition(".")
        for gguf_base, module in names.layer.items():
            if rest.startswith(module + ".") and idx.isdigit():
                return f"blk.{idx}.{gguf_base}.{rest[len(module) + 1:]}"
        return None
    for gguf_base, module in names.globals.items():
        if name.startswith(module + "."):
            return f"{gguf_base}.{name[len(module) + 1:]}"
    return None


def llama_permute_rows(w: np.ndarray, n_head: int, inverse: bool) -> np.ndarray:
    """llama.cpp's rotary layout change on Q/K rows (per head: interleaved pairs <-> two halves).

    ``w``: [n_head * head_dim, ...] (a weight, a bias, or packed quantized rows [rows, bytes]).
    Forward (HF -> GGUF): rows of each head viewed as [2, head_dim/2] are transposed to [head_dim/2, 2].
    """
    rest = w.shape[1:]
    half = w.shape[0] // n_head // 2
    if inverse:  # GGUF -> HF
        return w.reshape(n_head, half, 2, *rest).swapaxes(1, 2).reshape(w.shape)
    return w.reshape(n_head, 2, half, *rest).swapaxes(1, 2).reshape(w.shape)


# --------------------------------------------------------------------------------------------- config
_DECODER_KEYS = {
    "context_length": "max_position_embeddings", "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size", "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps", "rope.freq_base": "rope_theta", "vocab_size": "vocab_size",
}
CONFIG_KEYS: dict[str, dict[str, str]] = {
    "llama": {**_DECODER_KEYS, "rope.dimension_count": "head_dim"},
    "qwen2": dict(_DECODER_KEYS),
    "gemma3": {**_DECODER_KEYS, "attention.key_length": "head_dim", "attention.sliding_window": "sliding_window"},
    "gpt2": {"block_count": "n_layer", "context_length": "n_ctx", "embedding_length": "n_embd",
             "attention.head_count": "n_head", "attention.layer_norm_epsilon": "layer_norm_epsilon",
             "feed_forward_length": "n_inner", "vocab_size": "vocab_size"},
}
# Activation fields, equal to the HF class defaults, spelled out so a reader of config.json needs no class.
ACTIVATIONS = {"llama": {"hidden_act": "silu"}, "qwen2": {"hidden_act": "silu"},
               "gemma3": {"hidden_activation": "gelu_pytorch_tanh"}, "gpt2": {"activation_function": "gelu_new"}}
TOKEN_ID_KEYS = {"bos_token_id": "tokenizer.ggml.bos_token_id", "eos_token_id": "tokenizer.ggml.eos_token_id",
                 "unk_token_id": "tokenizer.ggml.unknown_token_id", "pad_token_id": "tokenizer.ggml.padding_token_id"}


def gguf_to_hf_config(arch: str, meta: dict[str, Any], tensor_names: list[str],
                      embed_rows: int | None) -> dict[str, Any]:
    """Map GGUF metadata to a Hugging Face config.json dict for ``arch``."""
    architecture, model_type = HF_ARCHS[arch]
    cfg: dict[str, Any] = {"architectures": [architecture], "model_type": model_type, **ACTIVATIONS[arch]}
    for gguf_key, hf_key in CONFIG_KEYS[arch].items():
        value = meta.get(f"{arch}.{gguf_key}")
        if value is None:
            continue
        if isinstance(value, list):  # per-layer values (e.g. head_count_kv): HF keeps one number
            value = max(value)
        cfg[hf_key] = value
    if arch == "gpt2" and "n_ctx" in cfg:
        cfg["n_positions"] = cfg["n_ctx"]
    if "vocab_size" not in cfg:
        tokens = meta.get("tokenizer.ggml.tokens")
        cfg["vocab_size"] = embed_rows if embed_rows is not None else len(tokens or [])
    rope_type = meta.get(f"{arch}.rope.scaling.type")
    if isinstance(rope_type, str) and rope_type not in ("none", ""):
        scaling: dict[str, Any] = {"rope_type": rope_type, "type": rope_type}
        if (factor := meta.get(f"{arch}.rope.scaling.factor")) is not None:
            scaling["factor"] = float(factor)
        if (orig := meta.get(f"{arch}.rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = int(orig)
        cfg["rope_scaling"] = scaling
    cfg["tie_word_embeddings"] = "output.weight" not in tensor_names
    for hf_key, gguf_key in TOKEN_ID_KEYS.items():
        if (value := meta.get(gguf_key)) is not None:
            cfg[hf_key] = int(value)
    return cfg


# --------------------------------------------------------------------------------------------- tokenizer
# llama.cpp token types (tokenizer.ggml.token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns for `tokenizer.ggml.pre` values whose merges were learned on a non-GPT-2
# split (the GPT-2 pattern is ByteLevel's built-in one). Written from the models' published regexes.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_SPLITS = {"llama3": LLAMA3_SPLIT, "llama-v3": LLAMA3_SPLIT, "llama-bpe": LLAMA3_SPLIT, "smaug-bpe": LLAMA3_SPLIT,
              "dbrx": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT, "deepseek-r1-qwen": QWEN2_SPLIT}


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (printable Latin-1 bytes map to themselves)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def merges_from_vocab(vocab: dict[str, int], scores: dict[str, float] | None) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary (SentencePiece GGUFs store none).

    Every split of a token into two vocabulary pieces is a merge; merges are ranked by the token's
    score, best first (or by vocabulary id when there are no scores), ties by piece lengths, then by
    piece ids: the order transformers uses, so both build the same tokenizer.
    """
    keyed: dict[str, float] = dict(scores) if scores is not None else {k: float(v) for k, v in vocab.items()}
    found: list[tuple[str, str, float]] = []
    for token, score in keyed.items():
        local = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        found.extend(local)
    found.sort(key=lambda x: (x[2], len(x[0]), len(x[1])), reverse=scores is not None)
    return [(a, b) for a, b, _ in found]


def _byte_level_backend(meta: dict[str, Any], tokens: list[str]) -> tuple[Any, set[str] | None]:
    import tokenizers
    from tokenizers import Regex, decoders, models, pre_tokenizers

    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise CheckpointError("GGUF byte-level BPE tokenizer has no tokenizer.ggml.merges")
    spelling = byte_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):  # tokens outside the byte alphabet are respelled byte by byte
        vocab[tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))] = i
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, dropout=None, unk_token=None,
                                              continuing_subword_prefix="", end_of_word_suffix="",
                                              fuse_unk=False, byte_fallback=False))
    split = PRE_SPLITS.get(str(meta.get("tokenizer.ggml.pre")))
    if split is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, alphabet


def _sentencepiece_backend(meta: dict[str, Any], tokens: list[str], gemma: bool) -> tuple[Any, list[str]]:
    """SentencePiece vocabulary as a byte-fallback BPE (Metaspace), merges rebuilt from token scores.

    Gemma files store runs of spaces as real spaces and their scores do not follow merge order, so
    those tokens are respelled with U+2581 and ranked by position instead.
    """
    import tokenizers
    from tokenizers import decoders, models, normalizers, pre_tokenizers

    if gemma:
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores: dict[str, float] = {t: -float(i) for i, t in enumerate(tokens)}
    else:
        raw_scores = meta.get("tokenizer.ggml.scores")
        if raw_scores is None:
            raise CheckpointError("GGUF SentencePiece tokenizer has no tokenizer.ggml.scores")
        scores = dict(zip(tokens, (float(x) for x in raw_scores), strict=False))
    vocab = {t: i for i, t in enumerate(tokens)}
    file_merges = meta.get("tokenizer.ggml.merges")
    merges = ([tuple(m.split(" ", 1)) for m in file_merges] if file_merges
              else merges_from_vocab(vocab, scores))
    if gemma:
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, unk_token="<unk>",
                                                  dropout=None, byte_fallback=True))
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse()])
    else:
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                                  dropout=None))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    return backend, tokens


def tokenizer_from_gguf_metadata(meta: dict[str, Any]) -> Tokenizer:
    """Build the tokenizer a GGUF describes, as transformers builds it from the same file.

    ``tokenizer.ggml.model`` "gpt2": byte-level BPE from the vocabulary and merges, split regex chosen by
    ``tokenizer.ggml.pre``. "llama": SentencePiece as byte-fallback BPE (Gemma variant for gemma archs).
    Control tokens (type 3) and the bos/eos/unk/pad tokens become special added tokens, user-defined
    tokens (type 4) plain added tokens.
    """
    from tokenizers import AddedToken

    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    alphabet: set[str] | None = None
    if kind == "gpt2":
        backend, alphabet = _byte_level_backend(meta, tokens)
    elif kind == "llama":
        arch = str(meta.get("general.architecture", ""))
        backend, tokens = _sentencepiece_backend(meta, tokens, gemma=arch.startswith("gemma"))
    else:
        raise CheckpointError(f"GGUF tokenizer model {kind!r} is not supported "
                              "(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece)")
    vocab_tokens = set(tokens)

    special: dict[str, str] = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        tid = meta.get(f"tokenizer.ggml.{key}")
        if tid is not None and 0 <= int(tid) < len(tokens):
            special[name] = tokens[int(tid)]
    control = [t for t, ty in zip(tokens, types, strict=False)
               if ty == TOKEN_CONTROL and (alphabet is None or set(t) <= alphabet)]
    control += [t for t in special.values() if t not in control and t in vocab_tokens]
    if control:
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types, strict=False) if ty == TOKEN_USER_DEFINED and t in vocab_tokens]
    if user:
        backend.add_tokens(user)

    eos_ids = [int(meta[k]) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    template = meta.get("tokenizer.chat_template")
    # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama"))
    result = Tokenizer(backend, special_tokens=special, add_bos_token=add_bos,
                       chat_template=template if isinstance(template, str) else None, eos_ids=eos_ids)
    result.gguf_pre = str(meta.get("tokenizer.ggml.pre") or "")
    return result


# --------------------------------------------------------------------------------------------- file
GGUF_MAGIC = b"GGUF"
# GGUF metadata value types: id -> struct format (little-endian)
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One tensor's entry: ``shape`` in GGUF order (ne0 = columns first), absolute byte ``offset``."""

    name: str
    shape: tuple[int, ...]
    qtype: Any  # gguf.GGMLQuantizationType
    offset: int
    n_bytes: int


class GGUFFile:
    """A memory-mapped GGUF v2/v3 file: ``metadata`` (Python values) and ``tensors`` (infos + byte views).

    Why not ``gguf.GGUFReader``: it builds one numpy view per vocabulary string, which takes 10-30 s on
    a 49k-token vocabulary here; this parser reads the same header with `struct` in well under a second.
    Tensor bytes are never copied until `tensor_bytes` is de-quantized.
    """

    def __init__(self, path: Path) -> None:
        import mmap

        self.path = path
        with open(path, "rb") as f:
            try:
                self._buf: Any = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # empty file
                raise CheckpointError(f"{path} is not a GGUF file (empty)") from None
        self.size = len(self._buf)
        self._pos = 0
        try:
            self._parse()
        except (struct.error, UnicodeDecodeError, OverflowError, MemoryError) as e:
            raise CheckpointError(f"{path} is not a readable GGUF file (corrupt or truncated header): {e}") from None

    def _take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        n = self._take("<Q")
        if self._pos + n > self.size:
            raise struct.error("string runs past the end of the file")
        raw = self._buf[self._pos:self._pos + n]
        self._pos += n
        return bytes(raw).decode("utf-8")

    def _value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self._take(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            etype, count = self._take("<I"), self._take("<Q")
            if etype in _SCALARS:
                fmt = _SCALARS[etype]
                width = struct.calcsize(fmt)
                if self._pos + count * width > self.size:
                    raise struct.error("array runs past the end of the file")
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self._buf, self._pos))
                self._pos += count * width
                return values
            return [self._value(etype) for _ in range(count)]
        raise struct.error(f"unknown metadata value type {vtype}")

    def _parse(self) -> None:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        if bytes(self._buf[:4]) != GGUF_MAGIC:
            raise CheckpointError(f"{self.path} is not a GGUF file (bad magic {bytes(self._buf[:4])!r})")
        self._pos = 4
        self.version = self._take("<I")
        if self.version not in (2, 3):
            raise CheckpointError(f"{self.path}: GGUF version {self.version} is not supported (2 and 3 are; "
                                  "big-endian files are not)")
        n_tensors, n_kv = self._take("<Q"), self._take("<Q")
        if n_tensors > 1_000_000 or n_kv > 1_000_000:
            raise struct.error(f"implausible counts ({n_tensors} tensors, {n_kv} metadata keys)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = self._string()
            self.metadata[key] = self._value(self._take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._take("<I")
            shape = tuple(self._take("<Q") for _ in range(n_dims))
            infos.append((name, shape, self._take("<I"), self._take("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-self._pos // align) * align
        self.tensors: list[GGUFTensorInfo] = []
        for name, shape, type_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise CheckpointError(f"tensor {name!r} has unknown GGUF type id {type_id}") from None
            n_elements = int(np.prod(shape)) if shape else 1
            n_bytes = n_elements // block * type_size
            start = data_start + offset
            if start + n_bytes > self.size:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file")
            self.tensors.append(GGUFTensorInfo(name, shape, qtype, start, n_bytes))

    def tensor_bytes(self, t: GGUFTensorInfo) -> np.ndarray:
        """Read-only uint8 view [rows, bytes_per_row] of a tensor's data (rows = all dims but ne0)."""
        data = np.frombuffer(self._buf, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
        rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        return data.reshape(rows, -1)


# --------------------------------------------------------------------------------------------- tensors
def dequantize_tensor(f: GGUFFile, t: GGUFTensorInfo) -> np.ndarray:
    """A tensor as float32 numpy in HF (row-major, [rows, cols]) order (``gguf.quants.dequantize``)."""
    from gguf.quants import dequantize

    shape = tuple(reversed(t.shape))  # GGUF lists ne0 (columns) first
    try:
        arr = dequantize(f.tensor_bytes(t), t.qtype)
    except NotImplementedError:
        raise CheckpointError(f"tensor {t.name!r} has GGUF type {t.qtype.name}, which slimlm cannot "
                              "de-quantize") from None
    return np.array(arr.reshape(shape), dtype=np.float32)  # a writable copy, out of the memory map


# GGUF per-layer linears and globals that can stay quantized (``slimlm.quant.linear.gguf``)
NATIVE_LINEARS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "token_embd", "output")
NATIVE_ARCHS = ("llama", "qwen2", "gemma3")
FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def _native_plan(arch: str, t: GGUFTensorInfo) -> bool:
    """Whether tensor ``t`` is loaded as it is stored (a 2-D linear/embedding weight of a native type)."""
    from slimlm.quant.linear.gguf_blocks import NATIVE_TYPES

    base = t.name.split(".")[2] if t.name.startswith("blk.") else t.name.split(".")[0]
    return (arch in NATIVE_ARCHS and t.qtype.name in NATIVE_TYPES and len(t.shape) == 2
            and base in NATIVE_LINEARS and t.name.endswith(".weight"))


def read_gguf(path: str | os.PathLike[str], with_tokenizer: bool = True, native: bool = False,
              strict: bool = False) -> Checkpoint:
    """Read a GGUF file as a float32 `Checkpoint` under Hugging Face names.

    Args:
        path: the ``.gguf`` file.
        with_tokenizer: also build the tokenizer from the ``tokenizer.ggml.*`` metadata.
        native: keep the quantized linear/embedding weights of the types slimlm runs natively as raw
            blocks, ``meta["gguf_native"] = {hf_name: (type name, uint8 [rows, bytes], columns)}``
            (Q/K rows already un-permuted), instead of de-quantizing them; other quantized tensors are
            de-quantized with a one-line notice per type on stderr.
        strict: with ``native``, a quantized tensor that cannot stay quantized is an error instead.

    Raises:
        CheckpointError: not a GGUF / truncated, unsupported architecture or tensor type.
    """
    import sys

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such GGUF file: {path}")
    f = GGUFFile(path)
    meta = f.metadata
    arch = meta.get("general.architecture")
    if arch not in HF_ARCHS:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})")
    names = [t.name for t in f.tensors]
    embed = next((t for t in f.tensors if t.name == "token_embd.weight"), None)
    embed_rows = int(embed.shape[1]) if embed is not None and len(embed.shape) == 2 else None
    config = gguf_to_hf_config(arch, meta, names, embed_rows)

    tensors: dict[str, torch.Tensor] = {}
    raw: dict[str, tuple[str, np.ndarray, int]] = {}
    fallback: dict[str, list[str]] = {}
    types: dict[str, str] = {}
    skipped: list[str] = []
    for t in f.tensors:
        if t.name.split(".")[0] in IGNORED_TENSORS:
            skipped.append(t.name)
            continue
        hf_name = gguf_to_hf_name(arch, t.name)
        if hf_name is None:
            raise CheckpointError(f"GGUF tensor {t.name!r} has no Hugging Face name for architecture {arch!r}")
        types[hf_name] = t.qtype.name
        base = t.name.split(".")[2] if t.name.startswith("blk.") else t.name.split(".")[0]
        if native and _native_plan(arch, t):
            blocks = f.tensor_bytes(t)  # [rows, bytes]: a view of the memory map
            if arch == "llama" and base in ("attn_q", "attn_k"):  # whole rows move: exact on blocks
                blocks = llama_permute_rows(blocks, _heads(config, base), inverse=True)
            raw[hf_name] = (t.qtype.name, blocks, int(t.shape[0]))
            continue
        if native and t.qtype.name not in FLOAT_TYPES:
            if strict:
                raise CheckpointError(f"GGUF tensor {t.name!r} has type {t.qtype.name}, which slimlm does not run "
                                      "natively (drop --no-dequantize to de-quantize it)")
            fallback.setdefault(t.qtype.name, []).append(t.name)
        w = dequantize_tensor(f, t)  # [rows, cols] float32
        if arch == "llama" and base in ("attn_q", "attn_k"):
            w = llama_permute_rows(w, _heads(config, base), inverse=True)
        elif arch == "gemma3" and t.name.endswith("norm.weight"):
            w = w - np.float32(1.0)  # llama.cpp stores Gemma's (1 + w) RMSNorm scale
        elif arch == "gpt2" and base in GPT2_CONV1D and t.name.endswith(".weight"):
            w = np.ascontiguousarray(w.T)  # Conv1D: [in, out]
        tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(w))
    for qtype, which in fallback.items():
        more = f" and {len(which) - 1} more" if len(which) > 1 else ""
        print(f"slimlm: GGUF tensor {which[0]}{more} of type {qtype}: not run natively, de-quantized to float32",
              file=sys.stderr)

    tokenizer = None
    if with_tokenizer and "tokenizer.ggml.tokens" in meta:
        tokenizer = tokenizer_from_gguf_metadata(meta)
    extra: dict[str, Any] = {"gguf_native": raw} if native else {}
    return Checkpoint(config=config, tensors=tensors, tokenizer=tokenizer, source=str(path), format="gguf",
                      file_bytes=path.stat().st_size,
                      meta={"gguf_tensor_types": types, "gguf_architecture": arch,
                            "gguf_name": meta.get("general.name"), "gguf_file_type": meta.get("general.file_type"),
                            "gguf_skipped_tensors": skipped, **extra})


def _heads(config: dict[str, Any], base: str) -> int:
    """Heads of a llama Q (``attn_q``) or K (``attn_k``) projection."""
    heads = config["num_attention_heads"]
    return int(heads if base == "attn_q" else config.get("num_key_value_heads", heads))
