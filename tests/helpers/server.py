"""``slimlm``'s ASGI app under uvicorn on a free loopback port, in a thread (the server tests)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx  # the HTTP client the pinned openai package uses
import openai
import uvicorn

from slimlm.server.app import build_app


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(aeng: Any, tokenizer: Any, name: str = "tiny", **app_kw: Any) -> Iterator[tuple[openai.OpenAI, str]]:
    """Yields (openai client, base URL) while the server runs."""
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(aeng, tokenizer, name, **app_kw), host="127.0.0.1", port=port,
                                        log_level="warning"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    try:
        yield openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120), base
    finally:
        srv.should_exit = True
        th.join(timeout=30)


def metric(base: str, name: str) -> float:
    """One ``slimlm_<name>`` value of ``/metrics``."""
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(f"slimlm_{name} "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")
