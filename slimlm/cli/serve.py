"""``slimlm serve MODEL``: the OpenAI-compatible HTTP server (FastAPI + uvicorn) over the engine.

Example::

    slimlm serve smollm2-135m --port 8000 --max-num-seqs 16 --kv-budget-gib 0.5
    slimlm serve smollm2-135m --spec ngram          # or --spec self, or --draft DRAFT_MODEL
    slimlm serve smollm2-135m --adapter sql=out/sql --adapter chat=out/chat   # requests pick one by `model`
    slimlm serve smollm2-135m --kv-policy int8      # int8 KV blocks: about half the bytes of bf16
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
        -d '{"model": "smollm2-135m", "prompt": "The capital of France is", "max_tokens": 8}'
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from slimlm.cli.common import add_model_arg, add_runtime_args, int_arg, kv_policy_arg, load, status
from slimlm.utils.errors import SlimlmError


def parse_adapters(specs: list[str] | None, base_name: str) -> dict[str, Path]:
    """``["name=path", ...]`` -> {name: folder}, each a peft-format adapter folder; one clear error otherwise."""
    out: dict[str, Path] = {}
    for spec in specs or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise SlimlmError(f"--adapter {spec!r}: expected NAME=PATH (a peft adapter folder)")
        if name in out or name == base_name:
            raise SlimlmError(f"--adapter {spec!r}: the name {name!r} is already served")
        if not (Path(path) / "adapter_config.json").is_file():
            raise SlimlmError(f"--adapter {spec!r}: {path} is not an adapter folder (no adapter_config.json)")
        out[name] = Path(path)
    return out


def run_serve(args: argparse.Namespace) -> int:
    from slimlm.engine.scheduler import SchedulerConfig
    from slimlm.engine.spec import SpecConfig

    cfg = SchedulerConfig.from_args(args)  # validate the flags before loading the model
    spec = SpecConfig.from_args(args)
    from slimlm.engine.runner import paged_cache_class

    paged_cache_class(args.kv_policy)  # one line naming the policies the engine serves
    if not 0 < args.port < 65536:
        raise SlimlmError(f"--port must be in 1..65535, got {args.port}")
    name = args.served_model_name or args.model
    adapters = parse_adapters(args.adapter, name)
    try:
        import uvicorn

        from slimlm.server.app import build_app
    except ModuleNotFoundError as e:
        raise SlimlmError(f"serving needs {e.name} (pip install 'slimlm' with its dependencies)") from None
    from slimlm.engine.llm import LLMEngine
    from slimlm.server.async_engine import AsyncEngine

    lm = load(args)
    engine = LLMEngine(lm.model, lm.tokenizer, cfg, spec=spec, kv_policy=args.kv_policy)
    for a, folder in adapters.items():
        engine.add_adapter(a, folder)
    status(f"serving {name!r} on http://{args.host}:{args.port} ({engine.cfg.num_blocks} KV blocks of "
           f"{engine.cfg.block_size} tokens, {engine.runner.cache.nbytes / 2**30:.2f} GiB, KV {engine.kv_policy}"
           + (f"; speculative: {spec.method}, gamma <= {spec.num_speculative_tokens}" if spec.enabled else "")
           + (f"; LoRA adapters: {', '.join(adapters)}" if adapters else "") + ")")
    aengine = AsyncEngine(engine, max_waiting=args.max_waiting, own_thread=False)
    app = build_app(aengine, lm.tokenizer, name, args.allow_adapter_loading)
    return serve_in_main_thread(aengine, uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                                                        log_level="warning")))


def serve_in_main_thread(aengine: Any, server: Any) -> int:
    """HTTP (uvicorn) in a thread, the engine's steps in this, the main thread: torch's OpenMP
    kernels ran 2-2.5x slower in a second thread (measured here, AMD EPYC, 2 threads: batch-1 decode
    18 vs 40 tok/s). SIGINT / SIGTERM stop both; a server that cannot start (port taken) ends it."""
    import signal
    import threading

    http = threading.Thread(target=server.run, name="slimlm-http", daemon=True)

    def stop(signum: int, frame: Any) -> None:
        server.should_exit = True
        aengine.shutdown()

    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        aengine.run_here(until=lambda: not http.is_alive())
        while aengine.error is not None and http.is_alive() and not server.should_exit:
            http.join(0.5)  # the engine failed: keep answering /health and errors until stopped
    finally:
        server.should_exit = True
        aengine.shutdown()
        http.join(timeout=30)
        for s, h in old.items():
            signal.signal(s, h)
    if not server.started:
        raise SlimlmError("the HTTP server did not start (see uvicorn's message above; is the port taken?)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slimlm.engine.scheduler import SchedulerConfig
    from slimlm.engine.spec import SpecConfig

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    add_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int_arg(min=0, max=65535), default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, help="the `model` name clients send (default: MODEL)")
    p.add_argument("--adapter", action="append", metavar="NAME=PATH",
                   help="serve a peft-format LoRA adapter as model NAME (repeatable; mixed in one batch)")
    p.add_argument("--allow-adapter-loading", action="store_true",
                   help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (server-side paths)")
    p.add_argument("--max-waiting", type=int_arg(min=0), default=256, help="queued requests before answering 503 (default 256)")
    p.add_argument("--kv-policy", type=kv_policy_arg, default=None,
                   help="KV format of the block pool: full (default, the model dtype) or int8")
    SchedulerConfig.add_arguments(p)
    SpecConfig.add_arguments(p)
    add_runtime_args(p)
    p.set_defaults(func=run_serve)
