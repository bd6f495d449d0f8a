"""CLI: the foundation commands on a tiny model, and bad input -> one error line, exit 2."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimlm.cli.main import main
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    tok = make_tiny_tokenizer(vocab_size=384)
    make_hf_model("llama", d, vocab_size=384, max_position_embeddings=64)
    tok.save(d)
    return d


def run(argv, capsys):
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_info_json(tiny_dir, capsys):
    code, out, _ = run(["info", str(tiny_dir), "--json"], capsys)
    assert code == 0
    d = json.loads(out)
    assert d["architecture"] == "LlamaForCausalLM" and d["layers"] == 2 and d["kv_heads"] == 2
    from transformers import AutoModelForCausalLM

    assert d["parameters"] == AutoModelForCausalLM.from_pretrained(tiny_dir).num_parameters()
    assert d["size_on_disk_bytes"] == (tiny_dir / "model.safetensors").stat().st_size


def test_eval_json(tiny_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code, out, _ = run(["eval", str(tiny_dir), "--data", str(text), "--seq-len", "32", "--json", "--no-progress"], capsys)
    assert code == 0
    d = json.loads(out)
    # oracle: transformers on the same tokens, non-overlapping windows of 32, each scoring its last 31 tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    ids = AutoTokenizer.from_pretrained(tiny_dir)(text.read_text(), add_special_tokens=False)["input_ids"]
    n = len(ids) // 32
    with torch.no_grad():
        nll = sum(float(hf(w, labels=w).loss) * 31 for w in torch.tensor(ids[: n * 32]).view(n, 1, 32))
    assert d["tokens_scored"] == n * 31 and d["seconds"] >= 0
    assert abs(d["perplexity"] - math.exp(nll / (n * 31))) < 1e-4 * d["perplexity"]


def test_generate_json_ignore_eos_forces_length(tiny_dir, capsys):
    code, out, _ = run(["generate", str(tiny_dir), "--prompt", "def foo", "--max-new-tokens", "7",
                        "--ignore-eos", "--json"], capsys)
    assert code == 0
    d = json.loads(out)
    assert d["new_tokens"] == 7
    # greedy decoding (the default) gives transformers' greedy tokens
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf, hf_tok = AutoModelForCausalLM.from_pretrained(tiny_dir).eval(), AutoTokenizer.from_pretrained(tiny_dir)
    ids = torch.tensor([hf_tok("def foo", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=7, min_new_tokens=7,
                          do_sample=False, pad_token_id=0)[0, ids.shape[1]:]
    assert d["text"] == hf_tok.decode(ref, skip_special_tokens=True)
    assert d["decode_tokens_per_s"] > 0 and d["prefill_tokens_per_s"] > 0


def test_export_hf_roundtrip_transformers(tiny_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out_dir = tmp_path / "hf"
    code, _, _ = run(["export", str(tiny_dir), "--to", "hf", str(out_dir)], capsys)
    assert code == 0
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    got = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    ids = torch.randint(0, 384, (1, 12))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, got(ids).logits)
    # refuses to overwrite without --overwrite, and leaves the folder intact
    code, _, err = run(["export", str(tiny_dir), "--to", "hf", str(out_dir)], capsys)
    assert code == 2 and "already holds a model" in err


def _one_error_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and needle in lines[-1], err
    assert "Traceback" not in err


def test_missing_path(capsys):
    code, _, err = run(["info", "/nonexistent/model/dir"], capsys)
    _one_error_line(code, err, "no such model")


def test_folder_without_config(tmp_path, capsys):
    code, _, err = run(["info", str(tmp_path)], capsys)
    _one_error_line(code, err, "no config.json")


def test_truncated_safetensors(tiny_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    code, _, err = run(["info", str(bad)], capsys)
    _one_error_line(code, err, "truncated or corrupt")


def test_unsupported_architecture(tiny_dir, tmp_path, capsys):
    import shutil

    bad = tmp_path / "arch"
    shutil.copytree(tiny_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    cfg["model_type"] = "mamba"
    (bad / "config.json").write_text(json.dumps(cfg))
    code, _, err = run(["info", str(bad)], capsys)
    _one_error_line(code, err, "unsupported architecture 'MambaForCausalLM'")


def test_prompt_longer_than_context(tiny_dir, capsys):
    code, _, err = run(["generate", str(tiny_dir), "--prompt", "word " * 200, "--max-new-tokens", "4"], capsys)
    _one_error_line(code, err, "context")


def test_bad_sampling_value(tiny_dir, capsys):
    code, _, err = run(["generate", str(tiny_dir), "--prompt", "x", "--top-p", "1.5"], capsys)
    _one_error_line(code, err, "--top-p: expects a number in (0, 1]")  # refused while parsing


def test_real_process_exit_code_and_debug(tmp_path):
    """A real subprocess: exit code 2 and no traceback; --debug shows it."""
    cmd = [sys.executable, "-m", "slimlm.cli.main", "info", str(tmp_path / "nope")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "slimlm.cli.main", "--debug", "info", str(tmp_path / "nope")],
                       capture_output=True, text=True)
    assert "Traceback" in r.stderr


def test_every_command_module_registers_and_a_missing_one_is_an_error(monkeypatch):
    """A renamed command module must fail loudly, not drop its command from the CLI."""
    from slimlm.cli import main as cli_main

    sub = next(a for a in cli_main.build_parser()._actions if a.dest == "command")
    expected = {"info", "eval", "generate", "export", "demo", "quantize", "prune", "factorize", "convert-gqa"}
    assert expected <= set(sub.choices)  # type: ignore[arg-type]
    monkeypatch.setattr(cli_main, "COMMANDS", [*cli_main.COMMANDS, "slimlm.cli.renamed_away"])
    with pytest.raises(ModuleNotFoundError, match="renamed_away"):
        cli_main.build_parser()


def test_gguf_with_unsupported_tensor_type(tmp_path, capsys):
    import gguf
    import numpy as np

    path = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(path, "llama")
    w.add_uint32("llama.attention.head_count", 2)
    w.add_tensor("blk.0.attn_v.weight", np.zeros((4, 32), np.int8))  # I8: no de-quantizer
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    code, _, err = run(["info", str(path)], capsys)
    _one_error_line(code, err, "I8")


def test_export_gguf_then_load_back(tiny_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    code, _, _ = run(["export", str(tiny_dir), "--to", "gguf", str(out), "--gguf-type", "F32"], capsys)
    assert code == 0
    from slimlm.loaders import load_model

    a, b = load_model(str(tiny_dir)), load_model(str(out))
    ids = torch.randint(0, 384, (1, 10))
    with torch.no_grad():
        assert (a.model(ids) - b.model(ids)).abs().max() < 1e-4


def test_export_quantized_formats_need_a_quantized_model(tiny_dir, tmp_path, capsys):
    for fmt in ("compressed-tensors", "gptq"):
        code, _, err = run(["export", str(tiny_dir), "--to", fmt, str(tmp_path / fmt)], capsys)
        _one_error_line(code, err, "no quantized linears")
        assert not (tmp_path / fmt).exists()


def test_export_compressed_tensors_and_gptq_of_a_quantized_model(tiny_dir, tmp_path, capsys):
    q = tmp_path / "q"
    code, _, err = run(["quantize", str(tiny_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                        "--out", str(q)], capsys)
    assert code == 0, err
    for fmt in ("compressed-tensors", "gptq", "gguf"):
        out = tmp_path / (fmt + (".gguf" if fmt == "gguf" else ""))
        code, _, err = run(["export", str(q), "--to", fmt, str(out)], capsys)
        assert code == 0, err
        assert out.exists()
    cfg = json.loads((tmp_path / "compressed-tensors" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    # the GGUF holds the exact 4-bit codes: reading it back gives the quantized model's weights
    from slimlm.loaders import load_model

    a, b = load_model(str(q)), load_model(str(tmp_path / "gguf.gguf"), dequantize=True)
    wa = a.model.model.layers[0].mlp.down_proj.dense_weight()
    wb = b.model.model.layers[0].mlp.down_proj.weight
    assert (wa - wb).abs().max() < 1e-3 * wa.abs().max()
