"""``slimlm serve`` as a process: the engine steps in the main thread, uvicorn in another.

Why: torch's OpenMP kernels ran 2-2.5x slower in a second thread, so the CLI drives the engine from
the main thread (``slimlm.cli.serve.serve_in_main_thread``). These check what that must keep: it
answers, SIGTERM ends it cleanly (exit 0, quickly), and a port that is taken is one line and exit 2.

Run: ``.venv/bin/python -m pytest tests/cli/test_serve_process.py``
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.models import make_hf_model
from tests.helpers.server import free_port
from tests.helpers.tokenizers import make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny")
    tok = make_tiny_tokenizer()
    make_hf_model("llama", folder, vocab_size=tok.vocab_size, max_position_embeddings=256)
    tok.save(folder)
    return folder


def _serve(model: Path, port: int) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "slimlm.cli.main", "serve", str(model), "--port", str(port)],
                            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_healthy(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    raise AssertionError(f"server did not come up (exit {proc.poll()}): {proc.stderr.read() if proc.poll() else ''}")


def test_serves_then_sigterm_exits_cleanly(tiny: Path) -> None:
    port = free_port()
    proc = _serve(tiny, port)
    try:
        _wait_healthy(proc, port)
        body = json.dumps({"model": str(tiny), "prompt": [5, 6, 7], "max_tokens": 5, "temperature": 0,
                           "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            assert json.loads(r.read())["usage"]["completion_tokens"] == 5  # the main-thread engine answered
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_taken_port_is_one_line_and_exit_2(tiny: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = _serve(tiny, s.getsockname()[1])
        try:
            assert proc.wait(timeout=120) == 2
        finally:
            if proc.poll() is None:
                proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        assert "did not start" in err and "Traceback" not in err
