"""Tokenizer tests: transformers' AutoTokenizer is the oracle for encoding, decoding and chat templates.

Run: .venv/bin/pytest tests/loaders/test_tokenizer.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import transformers

from slimlm.loaders.tokenizer import StreamDecoder, Tokenizer
from slimlm.utils.errors import CheckpointError, SlimlmError
from tests.helpers.tokenizers import make_tiny_tokenizer

TEXTS = [
    "Hello world",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "def f(x):\n    return x ** 2  # Python code",
    "héllo wörld, naïve café — 你好，世界 🙂🚀",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>",
    "",
]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    return make_tiny_tokenizer(vocab_size=384)


@pytest.mark.parametrize("add_bos", [False, True])
def test_save_matches_transformers(tmp_path: Path, tiny: Tokenizer, add_bos: bool) -> None:
    tok = make_tiny_tokenizer(vocab_size=384)
    tok.add_bos_token = add_bos
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
        assert tok.encode(text, add_bos=tok.add_bos_token) == hf(text)["input_ids"]
        ids = tok.encode(text)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        assert tok.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    for gen in (True, False):
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == hf.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert hf.bos_token_id == tok.bos_token_id == 1
    assert hf.eos_token_id == tok.eos_token_id == 2
    assert hf.pad_token_id == tok.pad_token_id
    assert len(hf) == tok.vocab_size == 384


def test_from_hf_dir_reads_transformers_save(tmp_path: Path, tiny: Tokenizer) -> None:
    tiny.save(tmp_path / "a")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "a")
    hf.save_pretrained(tmp_path / "b")  # written by transformers itself
    (tmp_path / "b" / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    tok = Tokenizer.from_hf_dir(tmp_path / "b")
    assert tok.chat_template == tiny.chat_template
    assert tok.special_tokens == tiny.special_tokens
    assert tok.eos_token_ids == {0, 2}
    for text in TEXTS:
        assert tok.encode(text) == hf(text, add_special_tokens=False)["input_ids"]


def test_template_in_tokenizer_config_and_eos_from_template(tmp_path: Path, tiny: Tokenizer) -> None:
    tiny.save(tmp_path)
    (tmp_path / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = tiny.chat_template
    cfg["eos_token"] = "<|endoftext|>"  # base-model eos; the chat template ends turns with <|im_end|>
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 0, "bos_token_id": 1}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.chat_template == tiny.chat_template
    assert tok.eos_token_id == 0
    assert tok.eos_token_ids == {0, 2}


def test_no_chat_template_is_a_clear_error(tiny: Tokenizer) -> None:
    tok = Tokenizer(tiny.backend, special_tokens=tiny.special_tokens, chat_template=None)
    with pytest.raises(SlimlmError, match="no chat template"):
        tok.apply_chat_template(MESSAGES)
    assert tok.eos_token_ids == {2}


def test_template_raise_exception_and_sandbox(tiny: Tokenizer) -> None:
    tok = Tokenizer(tiny.backend, special_tokens=tiny.special_tokens,
                    chat_template="{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}"
                                  "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>hi<|im_end|>"
    with pytest.raises(SlimlmError, match="user first"):
        tok.apply_chat_template([{"role": "assistant", "content": "hi"}])
    evil = Tokenizer(tiny.backend, chat_template="{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SlimlmError):
        evil.apply_chat_template(MESSAGES)


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_stream_decoder_never_splits_characters(tiny: Tokenizer) -> None:
    text = "naïve café — 你好，世界 🙂🚀 done\n  indented"
    ids = tiny.encode(text)
    assert len(ids) > len(text) // 2  # tiny vocab: many multi-byte characters span several tokens
    stream = StreamDecoder(tiny)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tiny.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)
    assert sum(1 for p in pieces if p == "") > 0  # some tokens were held back (partial characters)


def test_stream_decoder_skips_special_tokens(tiny: Tokenizer) -> None:
    ids = tiny.encode("Hi there") + [2]
    stream = StreamDecoder(tiny)
    assert "".join(stream.feed(i) for i in ids) + stream.flush() == "Hi there"
