"""Outputs never destroy what slimlm did not write; they get umask permissions; stale temp copies go.

Issue 17 item 1: ``export --to hf DIR --overwrite`` deleted a user's folder (``DIR/thesis.txt``),
exported folders were 0700 / files 0600 whatever the umask, and a killed run's ``.NAME.tmp-*``
siblings stayed forever. Run: ``.venv/bin/pytest tests/loaders/test_outputs.py``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from slimlm.cli.main import main
from slimlm.loaders.outputs import MARKER, atomic_dir, check_output_dir
from slimlm.utils.errors import SlimlmError
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", d, vocab_size=384, max_position_embeddings=64)
    make_tiny_tokenizer(vocab_size=384).save(d)
    return d


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def user_folder(path: Path) -> dict[str, bytes]:
    """A folder that is not a model output: a thesis and a few other files."""
    path.mkdir(parents=True)
    (path / "thesis.txt").write_text("four years of work")
    (path / "config.json").write_text('{"mine": true}')  # looks like a model file, is not slimlm's
    (path / "notes").mkdir()
    (path / "notes" / "a.md").write_text("a")
    return snapshot(path)


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# Every command with --out/--overwrite (argv after the model; the out path is appended).
WRITERS = {
    "export-hf": ["export", "{model}", "--to", "hf", "{out}"],
    "export-compressed-tensors": ["export", "{model}", "--to", "compressed-tensors", "{out}"],
    "export-gptq": ["export", "{model}", "--to", "gptq", "{out}"],
    "quantize": ["quantize", "{model}", "--method", "rtn", "--bits", "4", "--group-size", "32", "--out", "{out}"],
    "prune": ["prune", "{model}", "--method", "magnitude", "--sparsity", "0.5", "--out", "{out}"],
    "factorize": ["factorize", "{model}", "--ratio", "0.8", "--out", "{out}"],
    "convert-gqa": ["convert-gqa", "{model}", "--kv-heads", "1", "--out", "{out}"],
}


def argv_for(name: str, model: Path, out: Path) -> list[str]:
    return [a.format(model=model, out=out) for a in WRITERS[name]]


@pytest.mark.parametrize("name", sorted(WRITERS))
def test_overwrite_never_replaces_a_folder_slimlm_did_not_write(name, tiny_dir, tmp_path, capsys):
    out = tmp_path / "x"
    before = user_folder(out)
    code, _, err = run(argv_for(name, tiny_dir, out) + ["--overwrite"], capsys)
    assert code == 2, err
    line = error_line(err)
    assert f"refusing to replace {out}" in line and "slimlm did not write" in line, line
    assert "2 other files" in line, line  # thesis.txt, config.json, notes/a.md: one named, two counted
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]  # no temp sibling left behind


def test_export_replaces_its_own_output_but_not_a_file_added_to_it(tiny_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert run(["export", tiny_dir, "--to", "hf", out], capsys)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert marker["written_by"] == "slimlm" and marker["kind"] == "hf"
    assert set(marker["files"]) == {p.name for p in out.iterdir()} - {MARKER}
    code, _, err = run(["export", tiny_dir, "--to", "hf", out], capsys)
    assert code == 2 and "already holds a model slimlm wrote; pass --overwrite" in error_line(err)
    (out / "config.json").write_text("{}")  # a file slimlm wrote, edited: still slimlm's to replace
    assert run(["export", tiny_dir, "--to", "hf", out, "--overwrite"], capsys)[0] == 0
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    (out / "README.md").write_text("my model card")
    code, _, err = run(["export", tiny_dir, "--to", "hf", out, "--overwrite"], capsys)
    assert code == 2 and "it holds README.md, which slimlm did not write" in error_line(err)
    assert (out / "README.md").read_text() == "my model card"


def test_marker_does_not_make_an_hf_export_a_slimlm_dir(tiny_dir, tmp_path, capsys):
    from slimlm.loaders import load_model

    hf, sl = tmp_path / "hf", tmp_path / "sl"
    assert run(["export", tiny_dir, "--to", "hf", hf], capsys)[0] == 0
    assert run(["quantize", tiny_dir, "--method", "rtn", "--bits", "8", "--group-size", "32", "--out", sl], capsys)[0] == 0
    assert load_model(str(hf)).checkpoint.format == "hf"
    assert load_model(str(sl)).checkpoint.format == "slimlm"
    assert json.loads((sl / MARKER).read_text())["kind"] == "slimlm-model"
    assert run(["quantize", tiny_dir, "--method", "rtn", "--bits", "8", "--group-size", "32", "--out", sl, "--overwrite"], capsys)[0] == 0


def test_a_folder_from_before_the_marker_is_still_replaceable(tiny_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert run(["quantize", tiny_dir, "--method", "rtn", "--bits", "8", "--group-size", "32", "--out", out], capsys)[0] == 0
    (out / MARKER).unlink()  # what slimlm wrote before this change
    assert run(["quantize", tiny_dir, "--method", "rtn", "--bits", "8", "--group-size", "32", "--out", out, "--overwrite"], capsys)[0] == 0
    (out / MARKER).unlink()
    (out / "thesis.txt").write_text("x")
    code, _, err = run(["quantize", tiny_dir, "--method", "rtn", "--bits", "8", "--group-size", "32", "--out", out, "--overwrite"], capsys)
    assert code == 2 and "thesis.txt" in error_line(err)


def test_file_added_while_writing_is_not_deleted(tmp_path):
    out = tmp_path / "m"
    atomic_dir(out, lambda tmp: (tmp / "a.bin").write_bytes(b"1"), kind="hf")
    check_output_dir(out, overwrite=True)

    def write(tmp: Path) -> None:  # the user saves a file into the old output during the long run
        (tmp / "a.bin").write_bytes(b"2")
        (out / "late.txt").write_text("mine")

    with pytest.raises(SlimlmError, match="late.txt"):
        atomic_dir(out, write, kind="hf")
    assert (out / "late.txt").read_text() == "mine" and (out / "a.bin").read_bytes() == b"1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_outputs_follow_the_umask(umask, tiny_dir, tmp_path, capsys):
    old = os.umask(umask)
    try:
        assert run(["export", tiny_dir, "--to", "hf", tmp_path / "hf"], capsys)[0] == 0
        assert run(["export", tiny_dir, "--to", "gguf", tmp_path / "m.gguf", "--gguf-type", "F32"], capsys)[0] == 0
    finally:
        os.umask(old)
    paths = [tmp_path / "hf", *(tmp_path / "hf").rglob("*"), tmp_path / "m.gguf"]
    assert len(paths) >= 5  # folder, config, weights, tokenizer files, marker
    for p in paths:
        mode = stat.S_IMODE(p.stat().st_mode)
        want = (0o777 if p.is_dir() else 0o666) & ~umask
        assert mode == want, f"{p.name}: {oct(mode)} != {oct(want)}"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_siblings_are_cleaned_on_the_next_write(tiny_dir, tmp_path, capsys):
    pid = dead_pid()
    stale = tmp_path / f".hf.tmp-slimlm-{pid}-0123abcd"  # a killed run's temp folder (marker first)
    stale.mkdir()
    (stale / MARKER).write_text(json.dumps({"written_by": "slimlm", "state": "writing", "pid": pid}))
    (stale / "model.safetensors").write_bytes(b"half")
    old = tmp_path / f".hf.old-slimlm-{pid}-89abcdef"  # a killed swap's previous output
    old.mkdir()
    (old / MARKER).write_text(json.dumps({"written_by": "slimlm", "files": ["config.json"]}))
    (old / "config.json").write_text("{}")
    unmarked = tmp_path / f".hf.tmp-slimlm-{pid}-deadbeef"  # right name, no marker: not provably ours
    unmarked.mkdir()
    (unmarked / "x").write_text("x")
    legacy = tmp_path / ".hf.tmp-a1b2c3d4"  # the older slimlm's mkdtemp name: reported, kept
    legacy.mkdir()
    running = tmp_path / f".hf.tmp-slimlm-{os.getpid()}-00000000"  # a run still in progress: kept
    running.mkdir()
    (running / MARKER).write_text(json.dumps({"written_by": "slimlm", "state": "writing"}))
    other = tmp_path / f".other.tmp-slimlm-{pid}-0123abcd"  # another output's: not this write's business
    other.mkdir()
    (other / MARKER).write_text(json.dumps({"written_by": "slimlm"}))
    gg = tmp_path / f".m.gguf.tmp-slimlm-{pid}-0123abcd"  # a killed GGUF write
    gg.write_bytes(b"GGUF")

    code, _, err = run(["export", tiny_dir, "--to", "hf", tmp_path / "hf"], capsys)
    assert code == 0, err
    assert not stale.exists() and not old.exists()
    assert unmarked.exists() and legacy.exists() and running.exists() and other.exists()
    notes = [ln for ln in err.splitlines() if ln.startswith("note:")]
    assert any(stale.name in ln and "removed" in ln for ln in notes), err
    assert any(old.name in ln and "removed" in ln for ln in notes), err  # once the new output is in place
    assert any(legacy.name in ln and unmarked.name in ln and "alone" in ln for ln in notes), err
    code, _, err = run(["export", tiny_dir, "--to", "gguf", tmp_path / "m.gguf", "--gguf-type", "F32"], capsys)
    assert code == 0 and not gg.exists() and gg.name in err


def test_gguf_overwrite_only_replaces_a_gguf_slimlm_wrote(tiny_dir, tmp_path, capsys):
    import gguf

    out = tmp_path / "m.gguf"
    argv = ["export", tiny_dir, "--to", "gguf", out, "--gguf-type", "F32"]
    assert run(argv, capsys)[0] == 0
    code, _, err = run(argv, capsys)
    assert code == 2 and "exists; pass --overwrite" in error_line(err)
    assert run(argv + ["--overwrite"], capsys)[0] == 0
    # a GGUF from another tool (written with the gguf package, no slimlm key) and a non-GGUF file
    w = gguf.GGUFWriter(str(tmp_path / "theirs.gguf"), "llama")
    w.add_tensor("t", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    (tmp_path / "thesis.gguf").write_text("not a model")
    for name in ("theirs.gguf", "thesis.gguf"):
        before = (tmp_path / name).read_bytes()
        code, _, err = run(["export", tiny_dir, "--to", "gguf", tmp_path / name, "--overwrite"], capsys)
        assert code == 2 and f"refusing to replace {tmp_path / name}: slimlm did not write it" in error_line(err)
        assert (tmp_path / name).read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_current_folder_is_not_an_output(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # empty, but "." has no sibling to write next to
    for out in (".", ".."):
        code, _, err = run(["export", tiny_dir, "--to", "hf", out], capsys)
        assert code == 2 and "has no name of its own" in error_line(err)
    assert list(tmp_path.iterdir()) == []
