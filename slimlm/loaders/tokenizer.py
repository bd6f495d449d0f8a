"""The slimlm tokenizer: a `tokenizers.Tokenizer` plus the special tokens and chat template around it.

Why: every loader (HF folder, GGUF file, slimlm output dir) must hand the runtime one tokenizer type
that encodes exactly like transformers does, knows when a chat reply ends (``eos_token_ids``), renders
the model's chat template, streams text to a terminal without splitting characters, and saves itself
so that ``transformers.AutoTokenizer.from_pretrained(out_dir)`` reads it back. transformers itself is
only a test oracle here (it is a dev dependency), so this module needs only ``tokenizers`` + ``jinja2``.

Example:
    tok = Tokenizer.from_hf_dir("path/to/hf_model")
    ids = tok.encode("Hello world", add_bos=tok.add_bos_token)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    stream = StreamDecoder(tok)
    for i in ids: print(stream.feed(i), end="")

Tests: ``.venv/bin/pytest tests/loaders/test_tokenizer.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import tokenizers

from slimlm.utils.errors import CheckpointError, SlimlmError

# End-of-turn markers used by common chat templates; one counts as a stop token when it is a real token
# of the vocabulary and the chat template mentions it.
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>")

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return data


def _write_text_atomic(path: Path, text: str) -> None:
    from slimlm.loaders.outputs import write_text_atomic  # temp file + rename, mode per the umask

    write_text_atomic(path, text)


@lru_cache(maxsize=16)
def _compile_template(template: str) -> Any:
    """Compile a chat template the way transformers does (sandboxed, trim/lstrip blocks, loopcontrols)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
               separators: Any = None, sort_keys: bool = False) -> str:
        # transformers' tojson: no HTML escaping, json.dumps options exposed
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


class Tokenizer:
    """A `tokenizers.Tokenizer` with special tokens, BOS policy, stop tokens and chat template.

    Args:
        backend: the fast tokenizer (vocabulary, merges, normalizer, pre-tokenizer, decoder).
        special_tokens: ``{"bos_token": "<s>", "eos_token": ..., "pad_token": ..., "unk_token": ...}``
            (missing keys = no such token).
        add_bos_token: whether the model expects a BOS token in front of a prompt.
        chat_template: the jinja chat template, or None.
        eos_ids: extra end-of-sequence ids from config.json / generation_config.json / GGUF metadata.
        bos_id, pad_id: ids to use when the special token string is not known (e.g. GGUF metadata).
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, special_tokens: dict[str, str] | None = None,
                 add_bos_token: bool = False, chat_template: str | None = None,
                 eos_ids: Iterable[int] = (), bos_id: int | None = None, pad_id: int | None = None) -> None:
        self.backend = backend
        self.special_tokens: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.add_bos_token = bool(add_bos_token)
        self.chat_template = chat_template
        self._extra_eos = [int(i) for i in eos_ids]
        self._bos_id = bos_id
        self._pad_id = pad_id
        self.gguf_pre = ""  # tokenizer.ggml.pre of the GGUF this came from (kept when written back to GGUF)

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json,
        config.json eos ids) from a Hugging Face model folder."""
        root = Path(path)
        tok_file = root / "tokenizer.json"
        if not tok_file.is_file():
            raise CheckpointError(f"no tokenizer.json in {root} (only fast tokenizers are supported)")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as e:  # the Rust side raises plain Exception subclasses
            raise CheckpointError(f"cannot read {tok_file}: {e}") from e
        cfg = _read_json(root / "tokenizer_config.json") if (root / "tokenizer_config.json").is_file() else {}
        special = {k: c for k in SPECIAL_TOKEN_KEYS if (c := _token_content(cfg.get(k))) is not None}

        template: str | None = None
        if (root / "chat_template.jinja").is_file():
            template = (root / "chat_template.jinja").read_text(encoding="utf-8")
        elif (root / "chat_template.json").is_file():
            template = _read_json(root / "chat_template.json").get("chat_template")
        else:
            template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if not isinstance(template, str):
            template = None

        eos_ids: list[int] = []
        bos_id: int | None = None
        pad_id: int | None = None
        for name in ("generation_config.json", "config.json"):
            if (root / name).is_file():
                data = _read_json(root / name)
                eos_ids += _as_id_list(data.get("eos_token_id"))
                if bos_id is None and (found := _as_id_list(data.get("bos_token_id"))):
                    bos_id = found[0]
                if pad_id is None and (found := _as_id_list(data.get("pad_token_id"))):
                    pad_id = found[0]
        add_bos = cfg.get("add_bos_token")
        if add_bos is None:  # transformers then relies on the tokenizer.json post-processor
            add_bos = _post_processor_adds_bos(backend, special.get("bos_token"))
        return cls(backend, special_tokens=special, add_bos_token=bool(add_bos), chat_template=template,
                   eos_ids=eos_ids, bos_id=bos_id, pad_id=pad_id)

    # ----------------------------------------------------------------------------------------- ids
    def token_to_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def bos_token_id(self) -> int | None:
        tid = self.token_to_id(self.special_tokens.get("bos_token"))
        return tid if tid is not None else self._bos_id

    @property
    def eos_token_id(self) -> int | None:
        """The primary end-of-sequence id (the tokenizer's eos_token, else the first config eos)."""
        tid = self.token_to_id(self.special_tokens.get("eos_token"))
        if tid is not None:
            return tid
        return self._extra_eos[0] if self._extra_eos else None

    @property
    def eos_token_ids(self) -> set[int]:
        """Every id that ends a reply: config eos ids, eos_token and the chat template's end-of-turn token."""
        ids = set(self._extra_eos)
        if (tid := self.token_to_id(self.special_tokens.get("eos_token"))) is not None:
            ids.add(tid)
        if self.chat_template:
            for marker in END_OF_TURN_TOKENS:
                if marker in self.chat_template and (tid := self.token_to_id(marker)) is not None:
                    ids.add(tid)
        return ids

    @property
    def pad_token_id(self) -> int | None:
        tid = self.token_to_id(self.special_tokens.get("pad_token"))
        return tid if tid is not None else self._pad_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (base vocabulary + added tokens)."""
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    # ----------------------------------------------------------------------------------------- text
    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of ``text``; no special tokens are added except BOS when ``add_bos`` (and one exists)."""
        ids: list[int] = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            bos = self.bos_token_id
            if bos is None:
                raise SlimlmError("add_bos=True but the tokenizer has no BOS token")
            ids = [bos, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **kwargs: Any) -> str:
        """Render ``messages`` (``[{"role": "user", "content": "..."}]``) with the model's chat template."""
        if not self.chat_template:
            raise SlimlmError("this model has no chat template; use a plain prompt (no chat formatting)")
        import jinja2

        variables = {"bos_token": self.special_tokens.get("bos_token", ""),
                     "eos_token": self.special_tokens.get("eos_token", ""),
                     "pad_token": self.special_tokens.get("pad_token", ""),
                     "unk_token": self.special_tokens.get("unk_token", "")}
        variables.update(kwargs)
        try:
            return str(_compile_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables))
        except jinja2.TemplateError as e:
            raise SlimlmError(f"chat template failed: {e}") from e

    # ----------------------------------------------------------------------------------------- saving
    def hf_tokenizer_config(self) -> dict[str, Any]:
        """The tokenizer_config.json dict transformers needs to rebuild this tokenizer."""
        added: dict[str, Any] = {}
        for tid, tok in sorted(self.backend.get_added_tokens_decoder().items()):
            added[str(tid)] = {"content": tok.content, "lstrip": tok.lstrip, "normalized": tok.normalized,
                               "rstrip": tok.rstrip, "single_word": tok.single_word, "special": tok.special}
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "added_tokens_decoder": added,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        cfg.update(self.special_tokens)
        return cfg

    def _backend_for_save(self) -> tokenizers.Tokenizer:
        """The backend whose post-processor adds BOS exactly when ``add_bos_token`` says so.

        transformers' fast tokenizer adds special tokens only through tokenizer.json's post-processor
        (it ignores ``add_bos_token`` there), so the policy has to live in the saved post-processor.
        """
        bos = self.special_tokens.get("bos_token")
        if _post_processor_adds_bos(self.backend, bos) == self.add_bos_token:
            return self.backend
        data = json.loads(self.backend.to_str())
        proc = data.get("post_processor")
        procs = (proc.get("processors", []) if proc and proc.get("type") == "Sequence" else [proc] if proc else [])
        procs = [p for p in procs if p.get("type") != "TemplateProcessing"]
        bos_id = self.bos_token_id
        if self.add_bos_token and bos is not None and bos_id is not None:
            def piece(kind: str, name: str) -> dict[str, Any]:
                return {kind: {"id": name, "type_id": 0}}

            procs.append({"type": "TemplateProcessing",
                          "single": [piece("SpecialToken", bos), piece("Sequence", "A")],
                          "pair": [piece("SpecialToken", bos), piece("Sequence", "A"),
                                   piece("SpecialToken", bos), piece("Sequence", "B")],
                          "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}}})
        data["post_processor"] = (None if not procs else procs[0] if len(procs) == 1
                                  else {"type": "Sequence", "processors": procs})
        return tokenizers.Tokenizer.from_str(json.dumps(data))

    def save(self, out_dir: str | os.PathLike[str]) -> None:
        """Write tokenizer.json, tokenizer_config.json and chat_template.jinja into ``out_dir``."""
        root = Path(out_dir)
        root.mkdir(parents=True, exist_ok=True)
        _write_text_atomic(root / "tokenizer.json", self._backend_for_save().to_str(pretty=False))
        _write_text_atomic(root / "tokenizer_config.json", json.dumps(self.hf_tokenizer_config(), indent=2) + "\n")
        if self.chat_template:
            _write_text_atomic(root / "chat_template.jinja", self.chat_template)

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token_id}, eos={sorted(self.eos_token_ids)}, "
                f"add_bos={self.add_bos_token}, chat_template={'yes' if self.chat_template else 'no'})")


def _post_processor_adds_bos(backend: tokenizers.Tokenizer, bos: str | None) -> bool:
    """True when tokenizer.json's post-processor puts the BOS token in front of a single sequence."""
    if bos is None:
        return False
    try:
        data = json.loads(backend.to_str())
    except ValueError:
        return False
    proc = data.get("post_processor") or {}
    procs = proc.get("processors", [proc]) if proc.get("type") == "Sequence" else [proc]
    for p in procs:
        if p.get("type") == "TemplateProcessing":
            single = p.get("single") or []
            if single and "SpecialToken" in single[0] and single[0]["SpecialToken"].get("id") == bos:
                return True
    return False


class StreamDecoder:
    """Incremental detokenizer: ``feed(token_id)`` returns the new text (possibly "").

    It re-decodes a short window of recent ids and emits only the text that is final: a piece ending
    in U+FFFD (an incomplete UTF-8 sequence across byte tokens) is held back until the next token
    completes it, so multi-byte characters are never split. ``flush()`` returns whatever is left.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the decode window (context for space handling)
        self._read = 0  # ids before this index were already emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def feed(self, token_id: int) -> str:
        self._ids.append(int(token_id))
        done = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        if len(full) > len(done) and not full.endswith("\ufffd") and full.startswith(done):
            self._prefix, self._read = self._read, len(self._ids)
            return full[len(done):]
        return ""

    def flush(self) -> str:
        """Text of ids not emitted yet (an incomplete character stays as U+FFFD)."""
        done = self._decode(self._ids[self._prefix:self._read])
        full = self._decode(self._ids[self._prefix:])
        self._prefix = self._read = len(self._ids)
        return full[len(done):] if full.startswith(done) else full
