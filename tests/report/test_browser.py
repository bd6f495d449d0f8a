"""The HTML report in a real browser: headless Chromium renders it offline, not blank, with every
variant and every plot in the DOM.

Chromium is the Debian package ``chromium``; when it is absent and this process may install
packages (root, apt-get present), the fixture installs it, else the tests skip with the reason.
A blank page is screenshotted too, as the control that the blank check can fail.
Run: ``.venv/bin/python -m pytest tests/report/test_browser.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from slimlm.cli.main import main
from tests.helpers.bench import fake_results, fake_run

RUNS = [fake_run("alpha", [("base", 400e6, 10.0, 10.0), ("gptq-w4", 105e6, 21.0, 10.6), ("nf4", 120e6, 15.0, 10.4)]),
        fake_run("beta", [("base", 400e6, 30.0, 10.0), ("gptq-w4", 100e6, 90.0, 10.5)],
                 started="2026-12-02T09:00:00+0000")]
VARIANTS = {"base", "gptq-w4", "nf4"}
PLOTS = {"plot-quality-memory-wiki-txt", "plot-quality-speed-wiki-txt"}


def _find_chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = _find_chromium()
    if exe:
        return exe
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and this user cannot install it (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, timeout=600)
        r = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], env=env,
                           capture_output=True, text=True, timeout=1200)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"chromium could not be installed: {e}")
    exe = _find_chromium()
    if r.returncode != 0 or not exe:
        pytest.skip(f"chromium could not be installed (apt-get exit {r.returncode}: {r.stderr.strip()[-300:]})")
    return exe


def _browser(exe: str, url: str, *flags: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # a fresh profile per call; no network is needed (the page is a local file)
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={cwd / 'profile'}", *flags, url],
                          capture_output=True, text=True, timeout=180, cwd=cwd)


def _pixel_std(png: Path) -> float:
    import numpy as np
    from PIL import Image

    a = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    return float(a.std())


class _Dom(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str | None] = []  # the plot figure id each open element sits in
        self.svg_in: dict[str, int] = {}
        self.variants: set[str] = set()
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        fig = a.get("id") if tag == "figure" else (self.stack[-1] if self.stack else None)
        if tag == "svg" and fig:
            self.svg_in[fig] = self.svg_in.get(fig, 0) + 1
        if a.get("data-variant"):
            self.variants.add(str(a["data-variant"]))
        if tag not in ("br", "meta", "img", "input", "hr", "link"):
            self.stack.append(fig)

    def handle_endtag(self, tag: str) -> None:
        if self.stack and tag not in ("br", "meta", "img", "input", "hr", "link"):
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_renders_in_chromium(chromium: str, tmp_path: Path) -> None:
    res = tmp_path / "r.json"
    res.write_text(json.dumps(fake_results(*RUNS)))
    page = tmp_path / "report.html"
    assert main(["report", str(res), "--out", str(page)]) == 0
    shot = tmp_path / "shot.png"
    r = _browser(chromium, page.as_uri(), f"--screenshot={shot}", "--window-size=1280,2400", cwd=tmp_path)
    assert shot.is_file(), f"no screenshot (exit {r.returncode}): {r.stderr[-500:]}"
    # the control: a blank page gives (almost) no pixel variance; the report a lot
    blank = tmp_path / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    blank_shot = tmp_path / "blank.png"
    _browser(chromium, blank.as_uri(), f"--screenshot={blank_shot}", "--window-size=1280,2400", cwd=tmp_path)
    assert _pixel_std(blank_shot) < 1.0
    assert _pixel_std(shot) > 10.0

    dom = _browser(chromium, page.as_uri(), "--dump-dom", cwd=tmp_path)
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-500:]
    d = _Dom()
    d.feed(dom.stdout)
    assert d.variants == VARIANTS
    assert set(d.svg_in) == PLOTS and all(n == 1 for n in d.svg_in.values())
    text = " ".join(d.text)
    for label in VARIANTS:
        assert text.count(label) >= 4  # verdict, two tables, and the plot labels (SVG text)
    assert "alpha (CPU of alpha, 2 threads)" in text and "beta (CPU of beta, 2 threads)" in text
