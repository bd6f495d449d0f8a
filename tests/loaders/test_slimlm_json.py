"""A bad ``slimlm.json`` or a too-long window is one error line naming file and field, exit 2.

Issue 17 item 4: a ``slimlm.json`` that is not an object, names an unknown module kind or lacks a
spec field, and a calibration ``--seq-len`` beyond a learned-position model's context, escaped as
tracebacks / internal errors with exit 1. Run: ``.venv/bin/pytest tests/loaders/test_slimlm_json.py``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from slimlm.cli.main import main
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def one_error_line(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "internal error" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    """A slimlm model directory (RTN int4 g32 and an int8 head) written by the CLI."""
    d = tmp_path_factory.mktemp("m")
    make_hf_model("llama", d / "hf", vocab_size=384, max_position_embeddings=64)
    make_tiny_tokenizer(vocab_size=384).save(d / "hf")
    assert main(["quantize", str(d / "hf"), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--out", str(d / "q")]) == 0
    return d / "q"


def edited(src: Path, dst: Path, edit: Any) -> Path:
    shutil.copytree(src, dst)
    info = json.loads((dst / "slimlm.json").read_text())
    new = edit(info)  # edits change ``info`` in place, or return a Replace
    (dst / "slimlm.json").write_text(json.dumps(new.value if isinstance(new, Replace) else info))
    return dst


class Replace:
    def __init__(self, value: Any) -> None:
        self.value = value


def first_module(info: dict[str, Any]) -> dict[str, Any]:
    return next(iter(info["modules"].values()))


def _drop_spec_field(info: dict[str, Any]) -> None:
    spec = first_module(info)["spec"]
    spec.pop("group_size")


def _rename_first(info: dict[str, Any], new: str) -> None:
    k = next(iter(info["modules"]))
    info["modules"][new] = info["modules"].pop(k)


BAD = {  # name -> (edit of the parsed slimlm.json, text the error line must contain besides the file)
    "not an object": (lambda i: Replace([1, 2]), "must hold a JSON object"),
    "a string": (lambda i: Replace("hello"), "not a JSON str"),
    "no format_version": (lambda i: i.pop("format_version"), "'format_version' is missing"),
    "newer format_version": (lambda i: i.update(format_version=2), "'format_version' is 2; this slimlm reads format 1"),
    "format_version text": (lambda i: i.update(format_version="1"), "'format_version' must be an integer"),
    "modules not an object": (lambda i: i.update(modules=["x"]), "'modules' must be an object"),
    "no modules": (lambda i: i.pop("modules"), "'modules' is missing"),
    "entry not an object": (lambda i: i["modules"].update({"model.layers.0.mlp.up_proj": 3}), ".mlp.up_proj'] must be an object"),
    "unknown kind": (lambda i: first_module(i).update(kind="int3_magic"), "names unknown module kind 'int3_magic'"),
    "kind missing": (lambda i: first_module(i).pop("kind"), ".kind is missing"),
    "spec missing": (lambda i: first_module(i).pop("spec"), ".spec is missing"),
    "spec field missing": (_drop_spec_field, "q_proj'].spec: int4_weight spec is missing 'group_size'"),
    "spec key missing": (lambda i: first_module(i)["spec"].pop("symmetric"),
                         "lacks field 'symmetric', which kind 'int4_weight' needs"),
    "spec not an object": (lambda i: first_module(i).update(spec=[4]), ".spec must be an object"),
    "path names nothing": (lambda i: _rename_first(i, "model.layers.7.mlp.up_proj"), "names no module"),
    "path not a linear": (lambda i: _rename_first(i, "model.norm"), "names a Norm, not a linear layer"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_slimlm_json_is_one_line_naming_file_and_field(name, quantized, tmp_path, capsys):
    edit, needle = BAD[name]
    bad = edited(quantized, tmp_path / "bad", edit)
    code, _, err = run(["info", bad], capsys)
    one_error_line(code, err, str(bad / "slimlm.json"), needle)


def test_the_unedited_model_loads(quantized, capsys):
    code, out, err = run(["info", quantized, "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["compressed_modules"]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt2")
    make_hf_model("gpt2", d, vocab_size=384, n_positions=32)
    make_tiny_tokenizer(vocab_size=384).save(d)
    return d


def test_calibration_seq_len_beyond_learned_positions(gpt2_dir, tmp_path, capsys):
    from pydoc_data.topics import topics

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(topics.values())[:60_000])
    code, _, err = run(["quantize", gpt2_dir, "--method", "gptq", "--bits", "4", "--group-size", "32",
                        "--calib", calib, "--n-samples", "2", "--seq-len", "48", "--out", tmp_path / "q"], capsys)
    one_error_line(code, err, "48 exceeds the model's context of 32")
    assert not (tmp_path / "q").exists()
    code, _, err = run(["prune", gpt2_dir, "--method", "wanda", "--sparsity", "0.5", "--calib", calib,
                        "--calib-samples", "2", "--calib-seq-len", "48", "--out", tmp_path / "p"], capsys)
    one_error_line(code, err, "48 exceeds the model's context of 32")


def test_eval_seq_len_beyond_learned_positions(gpt2_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    code, _, err = run(["eval", gpt2_dir, "--data", text, "--seq-len", "33", "--no-progress"], capsys)
    one_error_line(code, err, "seq_len 33 exceeds the model's context of 32")
    code, out, err = run(["eval", gpt2_dir, "--data", text, "--seq-len", "32", "--no-progress", "--json"], capsys)
    assert code == 0 and json.loads(out)["tokens_scored"] > 0, err
