"""One calibration rule and one set of flag names for every calibrated command (issue 17 item 7).

A calibrated run without ``--calib`` is refused (one ``error:`` line, exit 2, nothing written);
``--calib builtin:pydoc`` is the explicit built-in choice and prints a warning; ``--calib-samples`` /
``--calib-seq-len`` are the names everywhere; ``quantize --help`` shows per-method defaults of shared flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimlm.cli.main import build_parser, main
from tests.sparsity.fixtures import tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("calibflags"))


CALIBRATED = [
    ["quantize", "{m}", "--method", "gptq", "--group-size", "32"],
    ["quantize", "{m}", "--method", "awq", "--group-size", "32"],
    ["prune", "{m}", "--method", "sparsegpt"],
    ["prune", "{m}", "--method", "wanda"],
    ["prune", "{m}", "--structured", "--kv-groups", "1"],
    ["factorize", "{m}", "--activation-aware"],
    ["convert-gqa", "{m}", "--kv-heads", "1", "--weighting", "activation"],
]


@pytest.mark.parametrize("argv", CALIBRATED, ids=lambda a: " ".join(a[2:4]))
def test_calibrated_run_without_calib_is_refused(argv: list[str], tiny: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main([a.replace("{m}", str(tiny)) for a in argv] + ["--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "needs calibration text" in err[0]
    assert "builtin:pydoc" in err[0] and not out.exists()


@pytest.mark.parametrize("argv", CALIBRATED, ids=lambda a: " ".join(a[2:4]))
def test_builtin_choice_warns_and_runs(argv: list[str], tiny: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main([a.replace("{m}", str(tiny)) for a in argv]
              + ["--calib", "builtin:pydoc", "--calib-samples", "2", "--calib-seq-len", "32", "--out", str(out),
                 "--no-progress", "--json"])
    cap = capsys.readouterr()
    assert rc == 0 and (out / "slimlm.json").is_file()
    assert any(line.startswith("warning: calibrating on builtin:pydoc") for line in cap.err.splitlines())


def test_uncalibrated_runs_need_no_calib(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for i, argv in enumerate([["prune", str(tiny), "--method", "magnitude"], ["factorize", str(tiny)],
                              ["convert-gqa", str(tiny), "--kv-heads", "1"],
                              ["quantize", str(tiny), "--method", "rtn", "--group-size", "32"]]):
        assert main(argv + ["--out", str(tmp_path / str(i)), "--no-progress", "--json"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_same_flag_names_everywhere_and_old_quantize_names_hidden() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    for cmd in ("quantize", "prune", "factorize", "convert-gqa"):
        flags = {o for a in sub[cmd]._actions for o in a.option_strings}
        assert {"--calib", "--calib-start-char", "--calib-samples", "--calib-seq-len", "--seed"} <= flags, cmd
    args = parser.parse_args(["quantize", "m", "--n-samples", "3", "--seq-len", "40"])
    assert (args.calib_samples, args.calib_seq_len) == (3, 40)
    text = sub["quantize"].format_help()
    assert "--n-samples" not in text and "--calib-samples" in text


def test_quantize_help_shows_per_method_defaults() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices  # type: ignore[attr-defined]
    helps = {a.dest: a.help for a in sub["quantize"]._actions}
    # three methods, two defaults: awq searches clipping by default, gptq and rtn do not
    assert "awq" in helps["clip_search"] and "(default True)" in helps["clip_search"]
    assert "gptq" in helps["clip_search"] and "(default False)" in helps["clip_search"]
    # one name, two meanings and defaults (GPTQ's lazy batch, NF4's absmax block)
    assert "gptq:" in helps["block_size"] and "128" in helps["block_size"] and "nf4:" in helps["block_size"]
    assert "64" in helps["block_size"]
    assert "['lm_head']" in helps["ignore"]  # a default_factory shown as its value, not None


def test_dry_run_records_calibration(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib = tmp_path / "c.txt"
    calib.write_text("a b c d e f g. " * 500)
    assert main(["quantize", str(tiny), "--method", "gptq", "--group-size", "32", "--calib", str(calib),
                 "--calib-samples", "3", "--calib-seq-len", "16", "--out", str(tmp_path / "q"), "--dry-run",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["calibration"]["n_samples"] == 3 and plan["calibration"]["seq_len"] == 16
