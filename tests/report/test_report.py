"""slimlm report: verdicts from known numbers, both machines shown, Markdown, Pareto front, bad input.

The runs are built by hand (tests/helpers/bench.py) so every expected ratio is computed here from
the chosen inputs, not by the code under test. Run: ``.venv/bin/python -m pytest tests/report``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from slimlm.bench.results import validation_errors
from slimlm.cli.main import main
from slimlm.report import load_runs, render_html, render_markdown
from slimlm.report.data import points, verdict
from slimlm.report.plots import pareto
from tests.helpers.bench import fake_results, fake_run

ALPHA = fake_run("alpha", [("base", 400e6, 10.0, 10.0), ("gptq-w4", 105e6, 21.0, 10.6), ("pruned", 600e6, 8.0, 9.0)])
BETA = fake_run("beta", [("base", 400e6, 30.0, 10.0), ("gptq-w4", 100e6, 90.0, 10.5)],
                started="2026-12-02T09:00:00+0000")


@pytest.fixture()
def two_files(tmp_path: Path) -> list[str]:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(fake_results(ALPHA)))
    b.write_text(json.dumps(fake_results(BETA)))
    return [str(a), str(b)]


def test_fake_runs_match_the_schema() -> None:
    assert validation_errors(fake_results(ALPHA, BETA)) == []


def test_verdicts_from_the_numbers() -> None:
    v = {(p.run["machine"]["name"], p.label): verdict(p) for p in points([ALPHA, BETA])}
    # 400/105 = 3.8x smaller, 21/10 = 2.1x faster, 10.6/10 - 1 = +6.0%
    assert v[("alpha", "gptq-w4")] == "gptq-w4: 3.8x smaller, 2.1x faster decode, +6.0% ppl"
    # 600/400 = 1.5x larger, 10/8 = 1.2x slower (1.25 rounds half-even), 9/10 - 1 = -10%
    assert v[("alpha", "pruned")] == "pruned: 1.5x larger, 1.2x slower decode, -10% ppl"
    # ratios stay within a run: beta's base is beta's, not alpha's (90/30 = 3.0x)
    assert v[("beta", "gptq-w4")] == "gptq-w4: 4.0x smaller, 3.0x faster decode, +5.0% ppl"
    assert v[("alpha", "base")].startswith("base: base, 400.0 MB of weights, 10.0 tok/s decode, ppl 10.00")


def test_failed_variant_verdict() -> None:
    run = json.loads(json.dumps(ALPHA))
    run["variants"][1] = {"label": "gptq-w4", "spec": "x", "model": "x", "dtype": "fp32", "adapter": None,
                          "status": "failed", "error": "load: CheckpointError: no such model file or folder: x"}
    assert validation_errors(fake_results(run)) == []
    pts = points([run])
    assert verdict(pts[1]) == "gptq-w4: failed (load: CheckpointError: no such model file or folder: x)"
    assert "failed" in render_html([run]) and "-10% ppl" in render_html([run])


def test_pareto_front() -> None:
    # (memory, ppl): (1, 10) and (4, 8) are optimal; (5, 9) is beaten by (4, 8); (1, 11) by (1, 10)
    assert pareto([(1, 10), (4, 8), (5, 9), (1, 11)], higher_x_better=False) == [0, 1]
    # (speed, ppl): higher speed is better: (20, 12) and (10, 9) optimal, (5, 9.5) beaten by (10, 9)
    assert pareto([(10, 9), (20, 12), (5, 9.5)], higher_x_better=True) == [0, 1]


def test_html_report_shows_both_machines(two_files: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "report.html"
    assert main(["report", *two_files, "--out", str(out)]) == 0
    page = out.read_text()
    assert "alpha (CPU of alpha, 2 threads)" in page and "beta (CPU of beta, 2 threads)" in page
    assert "2026-12-01 10:00" in page and "2026-12-02 09:00" in page
    assert page.count("<figure class='plot'") == 2 and page.count("<svg") == 2
    # nothing is fetched to view it: no external src/href, stylesheet link, script or CSS url()
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page)
    assert "<link" not in page and "<script" not in page and "@import" not in page
    assert not re.search(r"url\((?!#)", page)  # only the SVGs' own clip paths (url(#id))
    # the plots keep their text: every variant label is inside the SVGs, in the legend both machines
    svgs = "".join(re.findall(r"<svg.*?</svg>", page, flags=re.S))
    for label in ("gptq-w4", "pruned", "base"):
        assert label in svgs
    assert "alpha (CPU of alpha" in svgs and "beta (CPU of beta" in svgs
    assert "3.8x smaller, 2.1x faster decode, +6.0% ppl" in page


def test_markdown_report(two_files: list[str], tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    assert main(["report", *two_files, "--out", str(out)]) == 0
    md = out.read_text()
    assert "| variant | machine, date | perplexity |" in md
    assert "`gptq-w4: 4.0x smaller, 3.0x faster decode, +5.0% ppl`" in md
    assert md.count("| gptq-w4 |") == 4  # two runs x (the corpus table + the speed table)


def test_same_run_in_two_files_is_shown_once(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(fake_results(ALPHA)))
    b.write_text(json.dumps(fake_results(ALPHA, BETA)))
    assert [r["run_id"] for r in load_runs([str(a), str(b)])] == ["run-alpha", "run-beta"]
    assert "run-alpha" in render_markdown(load_runs([str(a)]))


@pytest.mark.parametrize("content, message", [
    ("{not json", "corrupt results file (invalid JSON at line 1"),
    (json.dumps({"schema": "slimlm-bench-results", "schema_version": 2, "runs": []}),
     "schema_version 2 is not supported"),
    (json.dumps({"hello": 1}), "not a slimlm bench results file"),
    (json.dumps({"schema": "slimlm-bench-results", "schema_version": 1, "runs": [{"run_id": "x"}]}),
     "does not match the results schema: runs/0"),
])
def test_bad_results_file(tmp_path: Path, capsys, content: str, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    out = tmp_path / "r.html"
    assert main(["report", str(bad), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {bad}: ") and message in err[0], err
    assert not out.exists()


def test_report_never_replaces_a_foreign_file(two_files: list[str], tmp_path: Path, capsys) -> None:
    mine = tmp_path / "notes.html"
    mine.write_text("<html>my notes</html>")
    assert main(["report", *two_files, "--out", str(mine)]) == 2
    assert "is not a report slimlm wrote" in capsys.readouterr().err
    assert mine.read_text() == "<html>my notes</html>"
    out = tmp_path / "r.html"
    assert main(["report", *two_files, "--out", str(out)]) == 0
    assert main(["report", two_files[0], "--out", str(out)]) == 0  # its own report is replaced
    assert "beta" not in out.read_text()
