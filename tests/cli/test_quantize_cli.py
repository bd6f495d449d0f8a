"""``slimlm quantize`` on a tiny model: recipe and flag runs, dry run, output loads in eval; bad input
-> one ``error:`` line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimlm.cli.main import main
from slimlm.loaders import load_model
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tinyq")
    make_hf_model("llama", d, vocab_size=384, max_position_embeddings=64)
    make_tiny_tokenizer(vocab_size=384).save(d)
    return d


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pydoc_data.topics import topics

    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text("\n\n".join(topics[k] for k in sorted(topics))[:20000])
    return p


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gptq_flags_json_and_reload(tiny_dir: Path, calib: Path, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "q"
    code, stdout, _ = run(["quantize", str(tiny_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
                           "--no-act-order", "--calib", str(calib), "--n-samples", "4", "--seq-len", "32",
                           "--out", str(out), "--json", "--no-progress"], capsys)
    assert code == 0
    d = json.loads(stdout)
    assert d["method"] == "gptq" and d["configs"][0]["act_order"] is False and d["configs"][0]["group_size"] == 32
    assert d["size_on_disk_bytes"] == (out / "model.safetensors").stat().st_size and d["peak_rss_bytes"] > 0
    meta = json.loads((out / "slimlm.json").read_text())
    assert meta["recipe"][0]["kind"] == "gptq" and meta["modules"]  # the swapped modules are recorded
    # other commands accept the output folder
    code, stdout, _ = run(["eval", str(out), "--data", str(calib), "--seq-len", "32", "--max-tokens", "256",
                           "--json", "--no-progress"], capsys)
    assert code == 0
    # the quantized model's own logits on the first 256 tokens, 8 windows of 32, each scoring its last 31
    lm = load_model(str(out))
    ids = torch.tensor(lm.tokenizer.encode(calib.read_text())[:256]).view(8, 32)
    with torch.no_grad():
        logits = lm.model(ids)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    assert json.loads(stdout)["perplexity"] == pytest.approx(float(nll.exp()), rel=1e-4)
    # refuses to overwrite without --overwrite, nothing changed
    before = (out / "model.safetensors").read_bytes()
    code, _, err = run(["quantize", str(tiny_dir), "--method", "rtn", "--group-size", "32", "--out", str(out)], capsys)
    assert code == 2 and "already holds a model" in err and "--overwrite" in err
    assert (out / "model.safetensors").read_bytes() == before


def test_recipe_with_flag_override(tiny_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r"
    code, stdout, _ = run(["quantize", str(tiny_dir), "--recipe", str(ROOT / "recipes" / "rtn-w4g128.yaml"),
                           "--group-size", "32", "--bits", "3", "--out", str(out), "--json", "--no-progress"], capsys)
    assert code == 0
    cfg = json.loads(stdout)["configs"][0]
    assert (cfg["kind"], cfg["bits"], cfg["group_size"]) == ("rtn", 3, 32)
    lm = load_model(str(out))
    w = lm.model.model.layers[0].mlp.up_proj.dense_weight()  # 3-bit: <= 8 levels per group of 32
    assert max(len(torch.unique(g)) for g in w.reshape(-1, 32)) <= 8


def test_dry_run_prints_plan_and_writes_nothing(tiny_dir: Path, calib: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dry"
    code, stdout, _ = run(["quantize", str(tiny_dir), "--method", "awq", "--group-size", "32", "--calib", str(calib),
                           "--n-samples", "4", "--seq-len", "32", "--out", str(out), "--dry-run", "--json"], capsys)
    assert code == 0 and not out.exists()
    d = json.loads(stdout)
    assert d["dry_run"] and d["linears"] == 14 and d["estimated_peak_bytes"] > 0 and d["estimated_seconds"] > 0
    code, stdout, _ = run(["quantize", str(tiny_dir), "--method", "nf4", "--out", str(out), "--dry-run"], capsys)
    assert code == 0 and "estimated peak memory" in stdout and "nf4(" in stdout and not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "gptx"], "unknown method 'gptx'"),
        (["--method", "rtn", "--bits", "9"], "argument --bits: expects an integer in [2, 8]"),
        (["--method", "rtn", "--bits", "1"], "argument --bits: expects an integer in [2, 8]"),
        (["--method", "rtn", "--act-order"], "--act-order does not apply to rtn"),
        (["--method", "gptq", "--group-size", "32", "--calib", "/nonexistent/c.txt"], "calibration file not found"),
        (["--method", "gptq", "--group-size", "32"], "needs calibration text"),
        (["--method", "gptq", "--group-size", "32", "--calib", "SHORT", "--n-samples", "128"], "fewer than the 128 x 512"),
        (["--recipe", "BADKEY"], "unknown key 'bitz'; allowed keys: act_order, bits"),
        (["--recipe", "/nonexistent/r.yaml"], "recipe file not found"),
        (["--method", "rtn", "--recipe", "BADKEY"], "either --recipe or --method"),
        ([], "--recipe FILE or --method"),
    ],
)
def test_errors_one_line_exit_2(argv: list[str], message: str, tiny_dir: Path, calib: Path, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: gptq\nbitz: 3\n")
    short = tmp_path / "short.txt"
    short.write_text("only a few words of text here. " * 30)
    argv = [str(bad) if a == "BADKEY" else str(short) if a == "SHORT" else a for a in argv]
    out = tmp_path / "o"
    code, _, err = run(["quantize", str(tiny_dir), *argv, "--out", str(out), "--no-progress"], capsys)
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], err
    assert not out.exists()
