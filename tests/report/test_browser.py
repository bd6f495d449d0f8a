"""The HTML report in a real browser: headless Chromium renders it offline, not blank, with every
variant and every plot in the DOM.

Chromium comes from :mod:`tests.helpers.browser` (the Debian package ``chromium``, installed when
absent and allowed, else the test skips with the reason). A blank page is screenshotted too, as the
control that the blank check can fail.
Run: ``.venv/bin/python -m pytest tests/report/test_browser.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimlm.cli.main import main
from tests.helpers.bench import fake_results, fake_run
from tests.helpers.browser import check_report_in_browser, chromium_or_skip

RUNS = [fake_run("alpha", [("base", 400e6, 10.0, 10.0), ("gptq-w4", 105e6, 21.0, 10.6), ("nf4", 120e6, 15.0, 10.4)]),
        fake_run("beta", [("base", 400e6, 30.0, 10.0), ("gptq-w4", 100e6, 90.0, 10.5)],
                 started="2026-12-02T09:00:00+0000")]
VARIANTS = {"base", "gptq-w4", "nf4"}
PLOTS = {"plot-quality-memory-wiki-txt", "plot-quality-speed-wiki-txt"}


@pytest.fixture(scope="module")
def chromium() -> str:
    return chromium_or_skip()


def test_report_renders_in_chromium(chromium: str, tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    res.write_text(json.dumps(fake_results(*RUNS)))
    page = tmp_path / "report.html"
    assert main(["report", str(res), "--out", str(page)]) == 0
    r = check_report_in_browser(chromium, page, tmp_path)
    # the control: a blank page gives (almost) no pixel variance; the report a lot
    assert r.blank_std < 1.0
    assert r.shot_std > 10.0
    assert r.variants == VARIANTS
    assert set(r.svg_in) == PLOTS and all(n == 1 for n in r.svg_in.values())
    for label in VARIANTS:
        assert r.text.count(label) >= 4  # verdict, two tables, and the plot labels (SVG text)
    assert "alpha (CPU of alpha, 2 threads)" in r.text and "beta (CPU of beta, 2 threads)" in r.text
