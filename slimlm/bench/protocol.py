"""The bench protocol: every variant measured the same way, in its own process, interleaved.

1. The machine record (CPU, flags, threads, measured bandwidth and GEMM rate) and the software
   versions, once per run.
2. One worker process per variant (:mod:`slimlm.bench.worker`) loads it: size on disk, RSS before
   and after the load, tensor bytes, bits per weight, KV-cache bytes. A variant that fails to load
   is recorded as failed with its one-line reason; the others go on.
3. Perplexity per corpus (:func:`slimlm.eval.perplexity.evaluate_perplexity`, deterministic:
   measured once).
4. ``warmup`` untimed rounds, then ``repeats`` timed rounds interleaved across the variants
   (A, B, A, B ...; :func:`slimlm.bench.timing.interleave`): prefill tok/s, time to first token and
   decode tok/s at batch 1, decode tok/s at ``concurrency`` streams; median, min, max, spread.
5. Peak RSS of each worker over its whole life (load, perplexity, generation).

All workers stay resident until the end (that is what lets rounds interleave), so the machine needs
the memory of every variant at once. Example::

    run = run_bench(BenchConfig(variants=["smollm2-135m", "bf16=smollm2-135m,dtype=bf16"]))
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from slimlm.bench.machine import machine_record, software_versions
from slimlm.bench.timing import interleave, summarize
from slimlm.utils.errors import SlimlmError

_OPTIONS = {"dtype", "adapter", "dequantize"}


@dataclass
class Variant:
    """One thing to bench: ``[LABEL=]MODEL[,dtype=fp32|bf16][,adapter=DIR][,dequantize=yes|no]``."""

    label: str
    spec: str
    model: str
    dtype: str = "fp32"
    adapter: str | None = None
    dequantize: bool | None = None

    @classmethod
    def parse(cls, spec: str, default_dtype: str = "fp32") -> Variant:
        head, *opts = spec.split(",")
        label = None
        if "=" in head and "/" not in head.split("=", 1)[0]:
            label, head = head.split("=", 1)
        if not head or label == "":
            raise SlimlmError(f"variant {spec!r}: expected [LABEL=]MODEL[,dtype=...][,adapter=DIR]")
        kv: dict[str, str] = {}
        for o in opts:
            k, sep, v = o.partition("=")
            if not sep or k not in _OPTIONS or not v:
                raise SlimlmError(f"variant {spec!r}: bad option {o!r} (options: dtype=fp32|bf16, adapter=DIR, "
                                  "dequantize=yes|no)")
            kv[k] = v
        dtype = kv.get("dtype", default_dtype)
        if dtype not in ("fp32", "bf16"):
            raise SlimlmError(f"variant {spec!r}: dtype must be fp32 or bf16, not {dtype!r}")
        deq = kv.get("dequantize")
        if deq not in (None, "yes", "no"):
            raise SlimlmError(f"variant {spec!r}: dequantize must be yes or no")
        adapter = kv.get("adapter")
        if label is None:
            label = Path(head).name or head
            if dtype != "fp32" or "dtype" in kv:
                label += f"-{dtype}"
            if adapter:
                label += f"+{Path(adapter).name}"
        return cls(label=label, spec=spec, model=head, dtype=dtype, adapter=adapter,
                   dequantize=None if deq is None else deq == "yes")


@dataclass
class BenchConfig:
    variants: list[str]
    data: list[str] = field(default_factory=list)  # corpora; empty: Python's documentation text
    prompt_tokens: int = 128
    new_tokens: int = 32
    concurrency: int = 4
    repeats: int = 3
    warmup: int = 1
    seq_len: int = 512
    max_tokens: int | None = 4096  # perplexity tokens per corpus (None: all)
    threads: int | None = None
    dtype: str = "fp32"
    base: str | None = None  # label of the variant the verdicts compare against (default: the first)
    machine_name: str | None = None
    timeout_s: float = 1800.0  # per worker command: a stuck variant fails, the run goes on
    progress: bool = True
    quick_machine: bool = False  # smaller bandwidth / GEMM probes (tests)


def corpus_record(path: str | None) -> dict[str, Any]:
    from slimlm.calib.data import read_text

    text = read_text(path)
    data = Path(path).read_bytes() if path else text.encode()
    return {"name": Path(path).name if path else "pydoc-topics", "path": path,
            "sha256": hashlib.sha256(data).hexdigest(), "chars": len(text)}


class WorkerProcess:
    """A running :mod:`slimlm.bench.worker`; :meth:`call` sends one command and waits (with a timeout)."""

    def __init__(self, threads: int | None):
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[2])  # this checkout's slimlm, whatever the cwd
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "slimlm.bench.worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, env=env)
        self.replies: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(line)
        self.replies.put(None)

    def call(self, cmd: str, timeout: float, **kw: Any) -> Any:
        """The command's result; raises :class:`RuntimeError` with the one-line reason on failure."""
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            raise RuntimeError(self._died()) from None
        try:
            line = self.replies.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            raise RuntimeError(f"{cmd} took longer than {timeout:.0f}s (worker stopped)") from None
        if line is None:
            raise RuntimeError(self._died())
        reply = json.loads(line)
        if not reply["ok"]:
            raise RuntimeError(reply["error"])
        return reply["result"]

    def _died(self) -> str:
        code = self.proc.wait(timeout=30)
        self.log.seek(0)
        lines = [ln.strip() for ln in self.log.read().splitlines() if ln.strip()]
        why = f": {lines[-1][:300]}" if lines else ""
        return f"worker process exited with code {code}{why}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self) -> None:
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.kill()
        self.log.close()


def run_bench(cfg: BenchConfig, command: str = "") -> dict[str, Any]:
    """Measure every variant of ``cfg``; returns one run of the results schema (not yet written)."""
    variants = [Variant.parse(s, cfg.dtype) for s in cfg.variants]
    labels = [v.label for v in variants]
    if len(set(labels)) != len(labels):
        dup = next(lb for lb in labels if labels.count(lb) > 1)
        raise SlimlmError(f"two variants are labelled {dup!r}: name them LABEL=MODEL")
    base = cfg.base or labels[0]
    if base not in labels:
        raise SlimlmError(f"--base {base!r} is none of the variants ({', '.join(labels)})")
    for p in cfg.data:
        if not Path(p).is_file():
            raise SlimlmError(f"corpus file not found: {p}")
    corpora = [corpus_record(p) for p in cfg.data] or [corpus_record(None)]
    names = [c["name"] for c in corpora]
    if len(set(names)) != len(names):
        for c in corpora:
            c["name"] = c["path"]
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    machine = machine_record(cfg.machine_name, cfg.threads, quick=cfg.quick_machine)
    rounds = cfg.warmup + cfg.repeats
    total = len(variants) * (2 + len(corpora) + rounds)
    bar = tqdm(total=total, desc="bench", unit="step", disable=not cfg.progress, dynamic_ncols=True)
    records: dict[str, dict[str, Any]] = {}
    workers: dict[str, WorkerProcess] = {}
    try:
        for v in variants:
            records[v.label] = _load(v, cfg, workers, corpora, bar)
        for v in variants:
            w = workers.get(v.label)
            for c in corpora:
                bar.set_postfix_str(f"{v.label}: perplexity {c['name']}")
                if w is not None:
                    try:
                        records[v.label]["perplexity"][c["name"]] = w.call(
                            "ppl", cfg.timeout_s, path=c["path"], seq_len=cfg.seq_len, max_tokens=cfg.max_tokens)
                    except RuntimeError as e:
                        _fail(records[v.label], workers, f"perplexity on {c['name']}: {e}")
                        w = None
                bar.update(1)
        samples = _speed(variants, cfg, workers, records, bar)
        for v in variants:
            rec = records[v.label]
            w = workers.get(v.label)
            if w is not None:
                try:
                    end = w.call("finish", cfg.timeout_s)
                    rec["memory"]["peak_rss_bytes"] = max(rec["memory"]["peak_rss_bytes"], end["peak_rss_bytes"])
                    rec["speed"] = {k: summarize(s) for k, s in samples.get(v.label, {}).items()}
                except RuntimeError as e:
                    _fail(rec, workers, f"finish: {e}")
            bar.update(1)
    finally:
        bar.close()
        for w in workers.values():
            w.close()
    return {"run_id": uuid.uuid4().hex[:12], "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command, "base": base, "machine": machine, "software": software_versions(),
            "settings": {"prompt_tokens": cfg.prompt_tokens, "new_tokens": cfg.new_tokens,
                         "concurrency": cfg.concurrency, "repeats": cfg.repeats, "warmup": cfg.warmup,
                         "seq_len": cfg.seq_len, "max_tokens": cfg.max_tokens, "threads": cfg.threads},
            "corpora": corpora, "variants": [records[lb] for lb in labels]}


def _load(v: Variant, cfg: BenchConfig, workers: dict[str, WorkerProcess], corpora: list[dict[str, Any]],
          bar: Any) -> dict[str, Any]:
    rec: dict[str, Any] = {"label": v.label, "spec": v.spec, "model": v.model, "dtype": v.dtype,
                           "adapter": v.adapter, "status": "ok", "error": None}
    bar.set_postfix_str(f"{v.label}: load")
    w = WorkerProcess(cfg.threads)
    workers[v.label] = w
    try:
        info = w.call("load", cfg.timeout_s, spec=v.model, dtype=v.dtype, adapter=v.adapter,
                      dequantize=v.dequantize, threads=cfg.threads, prompt_source=corpora[0]["path"],
                      prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens, concurrency=cfg.concurrency)
        rec.update(info, perplexity={}, speed={})
    except RuntimeError as e:
        _fail(rec, workers, f"load: {e}")
    bar.update(1)
    return rec


def _fail(rec: dict[str, Any], workers: dict[str, WorkerProcess], why: str) -> None:
    """Record the variant as failed (one line) and stop its worker; the run goes on without it."""
    tqdm.write(f"{rec['label']}: failed: {why}", file=sys.stderr)
    keep = ("label", "spec", "model", "dtype", "adapter")
    for k in list(rec):
        if k not in keep:
            del rec[k]
    rec.update(status="failed", error=why)
    w = workers.pop(rec["label"], None)
    if w is not None:
        w.kill()
        w.close()


def _speed(variants: list[Variant], cfg: BenchConfig, workers: dict[str, WorkerProcess],
           records: dict[str, dict[str, Any]], bar: Any) -> dict[str, dict[str, list[float]]]:
    """Warm-up and timed rounds, interleaved across the variants still running."""

    def measure(label: str) -> Any:
        def fn() -> dict[str, float]:
            w = workers.get(label)
            if w is None:  # failed in an earlier round
                return {}
            bar.set_postfix_str(f"{label}: generate")
            try:
                return w.call("round", cfg.timeout_s, new_tokens=cfg.new_tokens, concurrency=cfg.concurrency)
            except RuntimeError as e:
                _fail(records[label], workers, f"generation: {e}")
                return {}
            finally:
                bar.update(1)
        return fn

    live = {v.label: measure(v.label) for v in variants if v.label in workers}
    bar.update(cfg.warmup * (len(variants) - len(live)) + cfg.repeats * (len(variants) - len(live)))
    return interleave(live, cfg.repeats, cfg.warmup)
