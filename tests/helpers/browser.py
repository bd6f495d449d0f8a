"""The headless-Chromium check of an HTML report (issue 21 item 5), shared by the report and demo tests.

Chromium is the Debian package ``chromium``; when it is absent and this process may install packages
(root, apt-get present), :func:`chromium_or_skip` installs it, else the test skips with the reason.
:func:`check_report_in_browser` screenshots the page (and a blank page, the control that the blank
check can fail), dumps the rendered DOM and returns what it holds, for the caller to compare with the
variants and plots it expects.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

_VOID = ("br", "meta", "img", "input", "hr", "link")


def find_chromium() -> str | None:
    return next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)


def chromium_or_skip() -> str:
    """The Chromium executable, installed with apt-get when absent and allowed; else the test skips."""
    exe = find_chromium()
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
    exe = find_chromium()
    if r.returncode != 0 or not exe:
        pytest.skip(f"chromium could not be installed (apt-get exit {r.returncode}: {r.stderr.strip()[-300:]})")
    return exe


def browser(exe: str, url: str, *flags: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # a fresh profile per call; no network is needed (the page is a local file)
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={cwd / 'profile'}", *flags, url],
                          capture_output=True, text=True, timeout=180, cwd=cwd)


def pixel_std(png: Path) -> float:
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
        if tag not in _VOID:
            self.stack.append(fig)

    def handle_endtag(self, tag: str) -> None:
        if self.stack and tag not in _VOID:
            self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@dataclass
class Rendered:
    """What Chromium rendered: screenshot pixel spread (and the blank control's), the variants (their
    ``data-variant`` verdict lines), the SVGs inside each plot figure, and the page's text."""

    shot_std: float
    blank_std: float
    variants: set[str] = field(default_factory=set)
    svg_in: dict[str, int] = field(default_factory=dict)
    text: str = ""


def check_report_in_browser(exe: str, page: Path, work: Path) -> Rendered:
    """Render ``page`` in headless Chromium (screenshot + DOM dump); ``work`` is a scratch folder."""
    shot = work / "shot.png"
    r = browser(exe, page.as_uri(), f"--screenshot={shot}", "--window-size=1280,2400", cwd=work)
    assert shot.is_file(), f"no screenshot (exit {r.returncode}): {r.stderr[-500:]}"
    blank = work / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body></body></html>")
    blank_shot = work / "blank.png"
    browser(exe, blank.as_uri(), f"--screenshot={blank_shot}", "--window-size=1280,2400", cwd=work)
    dom = browser(exe, page.as_uri(), "--dump-dom", cwd=work)
    assert dom.returncode == 0 and "</html>" in dom.stdout, dom.stderr[-500:]
    d = _Dom()
    d.feed(dom.stdout)
    return Rendered(pixel_std(shot), pixel_std(blank_shot), d.variants, d.svg_in, " ".join(d.text))
