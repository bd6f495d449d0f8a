"""OpenAI-compatible HTTP API (FastAPI) over :class:`slimlm.server.async_engine.AsyncEngine`.

Endpoints: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (the model's chat template),
both with SSE streaming (``stream_options.include_usage``), ``n``, ``stop``, ``max_tokens``,
``temperature``, ``top_p``, ``top_k``, ``seed``, ``ignore_eos`` (vLLM's extension), ``kv_policy``
(slimlm's: a 400 unless it names the server's ``--kv-policy``); ``/health``;
Prometheus ``/metrics``. Bad input gets HTTP 4xx with an OpenAI-style ``{"error": {...}}`` body
(503 when overloaded) and the server stays up. ``logprobs`` (completions: top k; chat:
``logprobs`` + ``top_logprobs``) are the model's raw log-softmax. ``response_format`` (both endpoints):
``text``, ``json_object``, ``json_schema`` (a schema subset, see :mod:`slimlm.engine.structured`) and
slimlm's ``{"type": "regex", "regex": ...}``, enforced by token masks; an invalid or unsupported
schema is a 400. Not implemented: ``echo`` (rejected with 400, never silently ignored).

Multi-LoRA: the ``model`` field names the base model or a loaded LoRA adapter (``/v1/models`` lists
both; an unknown name is a 404); requests of different adapters share the engine's steps. With
``adapter_loading`` on, ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path"}`` and ``POST
/v1/unload_lora_adapter`` ``{"lora_name"}`` (vLLM's endpoints) change the adapters at run time.

Run: ``slimlm serve smollm2-135m --port 8000`` (see docs/serving.md), or build the app in-process::

    app = build_app(AsyncEngine(LLMEngine(lm.model, lm.tokenizer)), lm.tokenizer, "smollm2-135m")
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from slimlm.engine.llm import RequestOutput, TokenLogprob, UnknownAdapter
from slimlm.engine.sampling import SamplingConfig
from slimlm.models.kv_policy import KVPolicy
from slimlm.server.async_engine import AsyncEngine, Handle, Overloaded
from slimlm.utils.errors import SlimlmError


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    response_format: dict[str, Any] | None = None
    kv_policy: str | None = None  # slimlm's extension: must name the server's --kv-policy (one KV format per pool)

    def logprobs_k(self) -> int | None:
        return None


class CompletionRequest(_Sampling):
    prompt: str | list[int]
    max_tokens: int | None = 16
    echo: bool = False
    logprobs: int | None = None  # top alternatives per token (0 = only the chosen token's)

    def logprobs_k(self) -> int | None:
        return self.logprobs


class ChatPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ChatPart] | None = None


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def logprobs_k(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class LoadAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapterRequest(_Strict):
    lora_name: str = Field(min_length=1)


_FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}


def build_app(engine: AsyncEngine, tokenizer: Any, model_name: str, adapter_loading: bool = False) -> FastAPI:
    """The ASGI app; ``engine`` is started on startup and shut down with the app. ``adapter_loading``
    enables the LoRA load / unload endpoints (they read server-side paths: off unless asked for)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine._thread.is_alive():
            engine.start()
        yield
        engine.shutdown()

    app = FastAPI(title="slimlm", lifespan=lifespan)
    ctx_len = engine.engine.max_len
    created = int(time.time())

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"invalid request: {loc or 'body'}: {first.get('msg', 'malformed')}", param=loc or None)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(Overloaded)
    async def _overloaded(request: Request, exc: Overloaded) -> JSONResponse:
        return _error(503, str(exc), "server_overloaded")

    @app.exception_handler(UnknownAdapter)
    async def _unknown_adapter(request: Request, exc: UnknownAdapter) -> JSONResponse:  # unloaded meanwhile
        return _error(404, str(exc), "not_found_error", "model", "model_not_found")

    @app.exception_handler(SlimlmError)
    async def _slimlm(request: Request, exc: SlimlmError) -> JSONResponse:
        return _error(400, str(exc))

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"} if engine.alive else {"status": f"engine stopped: {engine.error}"},
                            200 if engine.alive else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        base = {"id": model_name, "object": "model", "created": created, "owned_by": "slimlm", "root": model_name,
                "parent": None, "max_model_len": ctx_len}
        return {"object": "list", "data": [base, *({**base, "id": a, "root": a, "parent": model_name}
                                                   for a in engine.adapters())]}

    def _runtime_loading() -> None:
        if not adapter_loading:
            raise ApiError(404, "loading adapters at run time is off (start the server with --allow-adapter-loading)",
                           "not_found_error")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadAdapterRequest) -> PlainTextResponse:
        _runtime_loading()
        if req.lora_name == model_name or req.lora_name in engine.adapters():
            raise ApiError(400, f"the name {req.lora_name!r} is already served", param="lora_name")
        try:
            await engine.add_adapter(req.lora_name, req.lora_path)
        except SlimlmError as e:
            raise ApiError(400, f"cannot load adapter {req.lora_name!r}: {e}", param="lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadAdapterRequest) -> PlainTextResponse:
        _runtime_loading()
        if req.lora_name not in engine.adapters():
            raise ApiError(404, f"the adapter {req.lora_name!r} is not loaded", "not_found_error", "lora_name")
        try:
            await engine.remove_adapter(req.lora_name)
        except SlimlmError as e:
            raise ApiError(409, str(e), "conflict_error", "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        m = await asyncio.to_thread(engine.metrics)
        rows = [("requests_running", "gauge", m["running"]), ("requests_waiting", "gauge", m["waiting"]),
                ("kv_blocks_used", "gauge", m["kv_blocks_used"]), ("kv_blocks_total", "gauge", m["kv_blocks_total"]),
                ("prefix_cache_hit_rate", "gauge", m["prefix_hit_rate"]),
                ("generation_tokens_per_second", "gauge", m["tokens_per_s"]),
                ("prompt_tokens_total", "counter", m["prompt_tokens"]),
                ("generation_tokens_total", "counter", m["generation_tokens"]),
                ("requests_finished_total", "counter", m["requests_finished"]),
                ("requests_aborted_total", "counter", m["requests_aborted"]),
                ("preemptions_total", "counter", m["preemptions"]),
                ("spec_acceptance_rate", "gauge", m["spec_acceptance_rate"]),
                ("spec_tokens_per_step", "gauge", m["spec_tokens_per_step"]),
                ("spec_draft_tokens_total", "counter", m["spec_proposed"]),
                ("spec_accepted_tokens_total", "counter", m["spec_accepted"]),
                ("lora_adapters_loaded", "gauge", len(engine.adapters()))]
        text = "".join(f"# TYPE slimlm_{n} {t}\nslimlm_{n} {float(v)}\n" for n, t, v in rows)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    def _check_model(req: _Sampling) -> str | None:
        """The LoRA adapter ``req.model`` names (None: the base model); 404 for an unknown name."""
        adapter = None
        if req.model != model_name:
            if req.model not in engine.adapters():
                served = ", ".join(repr(n) for n in [model_name, *engine.adapters()])
                raise ApiError(404, f"the model {req.model!r} does not exist (serving {served})",
                               "not_found_error", "model", "model_not_found")
            adapter = req.model
        if req.kv_policy is not None:
            try:
                asked = KVPolicy.parse(req.kv_policy)
            except SlimlmError as e:
                raise ApiError(400, str(e), param="kv_policy") from None
            kept = engine.engine.kv_policy
            if asked != kept:
                raise ApiError(400, f"this server keeps KV as {kept}; kv_policy {asked} needs a server started "
                               f"with --kv-policy {asked}", param="kv_policy")
        fmt = req.response_format
        if fmt is not None and fmt.get("type") != "text":
            from slimlm.engine.structured import compile_format

            if tokenizer is None:
                raise ApiError(400, "structured output needs a model with a tokenizer", param="response_format")
            try:
                compile_format(fmt)
            except SlimlmError as e:
                raise ApiError(400, f"invalid response_format: {e}", param="response_format",
                               code="invalid_response_format") from None
        return adapter

    def _params(req: _Sampling, prompt_len: int, max_tokens: int | None) -> list[SamplingConfig]:
        k = req.logprobs_k()
        if k is not None and not 0 <= k <= 20:
            raise ApiError(400, "logprobs / top_logprobs must be between 0 and 20", param="logprobs")
        if req.n < 1 or req.n > 16:
            raise ApiError(400, "n must be between 1 and 16", param="n")
        room = ctx_len - prompt_len
        if room < 1:
            raise ApiError(400, f"the prompt has {prompt_len} tokens; this model's context is {ctx_len}",
                           param="prompt", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = room
        if max_tokens < 1:
            raise ApiError(400, "max_tokens must be at least 1", param="max_tokens")
        if max_tokens > room:
            raise ApiError(400, f"this model's maximum context length is {ctx_len} tokens; you requested "
                                f"{prompt_len + max_tokens} ({prompt_len} in the prompt, {max_tokens} to generate)",
                           param="max_tokens", code="context_length_exceeded")
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        out = []
        for i in range(req.n):
            try:
                out.append(SamplingConfig(max_new_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                                          top_k=max(req.top_k, 0), stop=stops, ignore_eos=req.ignore_eos,
                                          seed=(req.seed if req.seed is not None else uuid.uuid4().int % 2**31) + i))
            except SlimlmError as e:
                raise ApiError(400, str(e)) from None
        return out

    def _encode_prompt(prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            ids: list[int] = tokenizer.encode(prompt) if tokenizer is not None else []
            if tokenizer is None:
                raise ApiError(400, "this model has no tokenizer: send the prompt as token ids", param="prompt")
        else:
            ids = list(prompt)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        return ids

    async def _merged(handles: list[Handle]) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Outputs of the n choices of one request, interleaved as they arrive."""
        queue: asyncio.Queue[tuple[int, RequestOutput | BaseException]] = asyncio.Queue()

        async def pump(i: int, h: Handle) -> None:
            try:
                async for o in engine.outputs(h):
                    await queue.put((i, o))
            except Exception as e:  # re-raised by the consumer
                await queue.put((i, e))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            left = len(handles)
            while left:
                i, o = await queue.get()
                if isinstance(o, BaseException):
                    raise o
                left -= o.finished
                yield i, o
        finally:
            for t in tasks:
                t.cancel()  # a client that went away aborts the choices still running

    def _tok(t: int) -> str:
        """A token's text; a piece of a multi-byte character (no text of its own) shows as its
        vocabulary entry, so distinct alternatives never share a key."""
        if tokenizer is None:
            return str(t)
        text: str = tokenizer.decode([t], skip_special_tokens=False)
        return text if "\ufffd" not in text else tokenizer.id_to_token(t) or text

    def completion_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """The legacy completions shape: parallel lists (``text_offset`` counts within these tokens)."""
        if lps is None:
            return None
        toks = [_tok(e.token) for e in lps]
        offs, pos = [], 0
        for t in toks:
            offs.append(pos)
            pos += len(t)
        return {"tokens": toks, "token_logprobs": [e.logprob for e in lps],
                "top_logprobs": [{_tok(t): lp for t, lp in e.top} for e in lps], "text_offset": offs}

    def chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if lps is None:
            return None

        def entry(t: int, lp: float) -> dict[str, Any]:
            s = _tok(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

        return {"content": [{**entry(e.token, e.logprob), "top_logprobs": [entry(t, lp) for t, lp in e.top]}
                            for e in lps]}

    async def _run(ids: list[int], params: list[SamplingConfig], chunk: Any, final_usage: bool,
                   stream: bool, logprobs: int | None, response_format: dict[str, Any] | None,
                   adapter: str | None) -> Any:
        """Admit the n choices (a 4xx comes before any streamed byte; the prompt is computed once), then
        either collect their final outputs or return the SSE event stream."""
        handles = await engine.submit(ids, params, logprobs, response_format, adapter)
        if not stream:
            last: dict[int, RequestOutput] = {}
            async for i, o in _merged(handles):
                last[i] = o
            return [last[i] for i in range(len(params))]
        hold = [max((len(s) for s in p.stop), default=1) - 1 for p in params]  # a stop string may be starting

        async def sse() -> AsyncIterator[str]:
            sent = [""] * len(params)
            toks = [0] * len(params)
            lp_sent = [0] * len(params)
            for i in range(len(params)):
                head = chunk(i, None, None, start=True)
                if head is not None:
                    yield f"data: {json.dumps(head)}\n\n"
            async for i, o in _merged(handles):
                text = o.text if o.finished or not hold[i] else o.text[:max(len(sent[i]), len(o.text) - hold[i])]
                delta = text[len(sent[i]):]
                sent[i] += delta
                toks[i] = len(o.token_ids)
                if delta or o.finished:
                    lps = o.logprobs[lp_sent[i]:] if o.logprobs is not None else None
                    lp_sent[i] += len(lps or [])
                    yield f"data: {json.dumps(chunk(i, delta, _FINISH.get(o.finish_reason or ''), lps=lps))}\n\n"
            if final_usage:
                yield f"data: {json.dumps(chunk(None, None, None, usage=_usage(len(ids), sum(toks))))}\n\n"
            yield "data: [DONE]\n\n"

        return sse()

    def _usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _respond(req: _Sampling, adapter: str | None, ids: list[int], params: list[SamplingConfig],
                       id_prefix: str, obj: str, chunk_obj: str, head: Any, delta: Any, final: Any) -> Any:
        """Run the request; the JSON answer, or the SSE stream of ``chunk_obj`` chunks. ``head(i)``
        is a choice's first chunk (None: none), ``delta(i, text, finish, logprobs)`` the next ones,
        ``final(i, output)`` a choice of the full answer."""
        rid, now = f"{id_prefix}-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int | None, text: str | None, finish: str | None, start: bool = False,
                  usage: dict[str, int] | None = None, lps: list[TokenLogprob] | None = None) -> dict[str, Any] | None:
            if start and head is None:
                return None
            choices = [] if i is None else [head(i) if start else delta(i, text, finish, lps)]
            body: dict[str, Any] = {"id": rid, "object": chunk_obj, "created": now, "model": req.model,
                                    "choices": choices}
            if include_usage:
                body["usage"] = usage
            return body

        fmt = req.response_format if req.response_format and req.response_format.get("type") != "text" else None
        res = await _run(ids, params, chunk, include_usage, req.stream, req.logprobs_k(), fmt, adapter)
        if req.stream:
            return StreamingResponse(res, media_type="text/event-stream")
        return {"id": rid, "object": obj, "created": now, "model": req.model,
                "choices": [final(i, o) for i, o in enumerate(res)],
                "usage": _usage(len(ids), sum(len(o.token_ids) for o in res))}

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Any:
        adapter = _check_model(req)
        if req.echo:
            raise ApiError(400, "echo is not supported", param="echo")
        ids = _encode_prompt(req.prompt)
        params = _params(req, len(ids), req.max_tokens)
        return await _respond(req, adapter, ids, params, "cmpl", "text_completion", "text_completion", None,
                              lambda i, text, finish, lps: {"index": i, "text": text, "finish_reason": finish,
                                                            "logprobs": completion_logprobs(lps)},
                              lambda i, o: {"index": i, "text": o.text, "logprobs": completion_logprobs(o.logprobs),
                                            "finish_reason": _FINISH[o.finish_reason]})

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest) -> Any:
        adapter = _check_model(req)
        if tokenizer is None:
            raise ApiError(400, "this model has no tokenizer (chat needs its chat template)")
        msgs = [{"role": m.role, "content": m.content if isinstance(m.content, str) or m.content is None
                 else "".join(p.text for p in m.content)} for m in req.messages]
        try:
            ids = tokenizer.encode(tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
        except SlimlmError as e:
            raise ApiError(400, str(e), param="messages") from None
        params = _params(req, len(ids), req.max_completion_tokens or req.max_tokens)
        return await _respond(req, adapter, ids, params, "chatcmpl", "chat.completion", "chat.completion.chunk",
                              lambda i: {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                         "finish_reason": None},
                              lambda i, text, finish, lps: {"index": i, "delta": {"content": text} if text else {},
                                                            "logprobs": chat_logprobs(lps), "finish_reason": finish},
                              lambda i, o: {"index": i, "message": {"role": "assistant", "content": o.text},
                                            "logprobs": chat_logprobs(o.logprobs),
                                            "finish_reason": _FINISH[o.finish_reason]})

    return app
