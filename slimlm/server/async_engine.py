"""The engine loop in a background thread, fed by coroutines: what the HTTP server talks to.

Why a thread: ``LLMEngine.step()`` is a blocking forward (torch releases the GIL inside its ops),
and the ASGI event loop must keep accepting connections and streaming meanwhile. All engine calls
take one lock, so ``add_request`` / ``abort`` run between steps: a cancelled request's blocks are
free at most one step after the client went away. Each request's outputs reach its coroutine through
an ``asyncio.Queue`` on the caller's event loop.

Example::

    aeng = AsyncEngine(LLMEngine(lm.model, lm.tokenizer))
    aeng.start()
    async for out in aeng.generate(prompt_ids, SamplingConfig(max_new_tokens=8)):  # in a coroutine
        print(out.new_token, out.finished)
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from slimlm.engine.llm import LLMEngine, RequestOutput
from slimlm.engine.sampling import SamplingConfig
from slimlm.utils.errors import SlimlmError


class Overloaded(SlimlmError):
    """More requests waiting than the server accepts (HTTP 503)."""


@dataclass
class Handle:
    rid: int
    queue: asyncio.Queue[Any]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, own_thread: bool = True):
        self.engine = engine
        # own_thread=False: the caller drives the steps with run_here() (`slimlm serve` does, from the
        # main thread: torch's OpenMP kernels ran 2-2.5x slower in a second thread here, AMD EPYC).
        self._own_thread = own_thread
        self.max_waiting = max_waiting
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._streams: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Queue[Any]]] = {}
        self._thread = threading.Thread(target=self._loop, name="slimlm-engine", daemon=True)
        self._stop = False
        self.error: BaseException | None = None
        self.counters = {"prompt_tokens": 0, "generation_tokens": 0, "requests_finished": 0, "requests_aborted": 0}
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of steps
        self._pending_aborts: collections.deque[int] = collections.deque()

    def start(self) -> None:
        if self._own_thread:
            self._thread.start()

    def run_here(self, until: Callable[[], bool] = lambda: False) -> None:
        """Run the step loop in the calling thread until :meth:`shutdown` or ``until()`` is true."""
        self._loop(until)

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        running = self._thread.is_alive() if self._own_thread else not self._stop
        return running and self.error is None

    def _add(self, prompt_ids: Sequence[int], params: Sequence[SamplingConfig], logprobs: int | None,
             response_format: dict[str, Any] | None, loop: asyncio.AbstractEventLoop,
             queues: Sequence[asyncio.Queue[Any]], adapter: str | None = None) -> list[int]:
        with self._lock:
            if len(self.engine.scheduler.waiting) >= self.max_waiting:
                raise Overloaded(f"server overloaded: {self.max_waiting} requests already waiting")
            rids = self.engine.add_group(prompt_ids, params, logprobs=logprobs, response_format=response_format,
                                         adapter=adapter)
            for rid, q in zip(rids, queues, strict=True):
                self._streams[rid] = (loop, q)
            self.counters["prompt_tokens"] += len(prompt_ids)
        self._wake.set()
        return rids

    def abort(self, rid: int) -> None:
        """Cancel now if the engine is between steps, else right after the running step."""
        if self._lock.acquire(blocking=False):
            try:
                self._abort_locked(rid)
            finally:
                self._lock.release()
        else:
            self._pending_aborts.append(rid)

    def _abort_locked(self, rid: int) -> None:
        if self.engine.abort(rid):
            self.counters["requests_aborted"] += 1
        self._streams.pop(rid, None)

    async def submit(self, prompt_ids: Sequence[int], params: Sequence[SamplingConfig],
                     logprobs: int | None = None, response_format: dict[str, Any] | None = None,
                     adapter: str | None = None) -> list[Handle]:
        """Queue one request per ``params`` entry, all on one prompt (computed once, see
        ``LLMEngine.add_group``) under LoRA ``adapter`` (None: the base); raises SlimlmError /
        Overloaded at once for one that cannot run."""
        if not self.alive:
            raise SlimlmError(f"engine stopped: {self.error}")
        queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in params]
        rids = await asyncio.to_thread(self._add, prompt_ids, params, logprobs, response_format,
                                       asyncio.get_running_loop(), queues, adapter)
        return [Handle(r, q) for r, q in zip(rids, queues, strict=True)]

    async def outputs(self, h: Handle) -> AsyncIterator[RequestOutput]:
        """Outputs of a submitted request as its tokens arrive; the last one has ``finished``.
        Leaving early (client disconnect, cancellation) aborts the request."""
        done = False
        try:
            while not done:
                o = await h.queue.get()
                if isinstance(o, BaseException):
                    raise SlimlmError(f"engine failed: {o}") from o
                done = o.finished
                yield o
        finally:
            if not done:
                self.abort(h.rid)

    async def generate(self, prompt_ids: Sequence[int], params: SamplingConfig) -> AsyncIterator[RequestOutput]:
        """``submit`` + ``outputs``."""
        (h,) = await self.submit(prompt_ids, [params])
        async for o in self.outputs(h):
            yield o

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    async def add_adapter(self, name: str, path: str) -> list[str]:
        """Load a LoRA adapter between two steps (``LLMEngine.add_adapter``)."""
        return await asyncio.to_thread(self._locked, self.engine.add_adapter, name, path)  # type: ignore[no-any-return]

    async def remove_adapter(self, name: str) -> None:
        """Unload a LoRA adapter between two steps; refused while a request uses it."""
        await asyncio.to_thread(self._locked, self.engine.remove_adapter, name)

    def adapters(self) -> list[str]:
        return list(self.engine.adapters)

    def _loop(self, until: Callable[[], bool] = lambda: False) -> None:
        eng = self.engine
        while not self._stop and not until():
            if not eng.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            try:
                with self._lock:
                    while self._pending_aborts:
                        self._abort_locked(self._pending_aborts.popleft())
                    if not eng.has_unfinished():
                        continue
                    outs = eng.step()
                    targets = [(o, self._streams.get(o.request_id)) for o in outs]
                    for o in outs:
                        if o.finished:
                            self._streams.pop(o.request_id, None)
            except BaseException as e:  # keep serving /health and errors; fail every open request
                self.error = e
                with self._lock:
                    for loop, q in self._streams.values():
                        loop.call_soon_threadsafe(q.put_nowait, e)
                    self._streams.clear()
                return
            n = sum(len(o.new_token_ids) for o in outs)
            now = time.monotonic()
            self.counters["generation_tokens"] += n
            self.counters["requests_finished"] += sum(o.finished for o in outs)
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - 10:
                self._recent.popleft()
            for o, target in targets:
                if target is not None:
                    target[0].call_soon_threadsafe(target[1].put_nowait, o)

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last 10 s."""
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self._recent) if t >= now - 10]
        return sum(n for _, n in recent) / 10.0

    def metrics(self) -> dict[str, float]:
        with self._lock:
            return {**self.engine.stats, **self.counters, "tokens_per_s": self.tokens_per_s()}
