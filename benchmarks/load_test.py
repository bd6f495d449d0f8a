"""Load test of ``slimlm serve`` over loopback: N requests at concurrency C, every answer checked.

Starts ``slimlm serve MODEL`` (a subprocess, optionally with ``--lora K`` random LoRA adapters that
requests pick by ``model``), sends ``--requests`` greedy completions ``--concurrency`` at a time
(token-id prompts of random lengths, so answers differ per request; every 3rd streamed, every
``--cancel-every``-th stream closed after its first chunk), and checks:

- 0 errors (every non-cancelled request answers 200 with its ``model``),
- 0 lost or mixed-up responses: each answer equals its own request's greedy output from the offline
  engine (``LLM.generate`` on the same model, adapters and prompts, in this process), or, where the
  text differs, is still a greedy answer to its own prompt: walked token by token with the request
  alone, every step takes a token within ``--tol`` (log-probability) of the most likely one. The
  server batches a request with whatever else runs, and a quantized model's batched kernels round
  differently from the offline batch's, so near-ties flip (on SmolLM2's Q4_1 GGUF about a third of
  these random-token prompts); the JSON counts exact answers, near-tie flips and the largest gap a
  flip took. A control checks the walk itself: answers walked against another request's prompt
  must all be rejected,
- the block pool back to empty at the end (``slimlm_kv_blocks_used`` of ``/metrics`` is 0), and a
  stream cancelled mid-way frees its blocks at once (the time until ``kv_blocks_used`` drops to 0).

Exits 1 if any check fails; the JSON goes to ``--out``. The acceptance run (issue 20)::

    .venv/bin/python benchmarks/load_test.py --model smollm2-135m --requests 1000 --concurrency 32 --lora 2

Smallest run (a tiny random model, seconds)::

    .venv/bin/python benchmarks/load_test.py --tiny --requests 40 --concurrency 8 --lora 2
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimlm.bench.sysinfo import save_json, system_info  # noqa: E402
from slimlm.engine.sampling import SamplingConfig  # noqa: E402


def tiny_model(folder: Path) -> str:
    """A tiny random Llama with a real (tiny) tokenizer, saved to ``folder`` (the smallest setting)."""
    from tests.helpers.models import make_hf_model
    from tests.helpers.tokenizers import make_tiny_tokenizer

    tok = make_tiny_tokenizer()
    make_hf_model("llama", folder, vocab_size=tok.vocab_size, max_position_embeddings=512)
    tok.save(folder)
    return str(folder)


def random_adapters(model: str, k: int, folder: Path, r: int = 8) -> dict[str, Path]:
    """``k`` random LoRA adapters (q/k/v/o, rank ``r``) in peft's format, written by slimlm."""
    from slimlm.loaders import load_model
    from slimlm.peft import LoraConfig, apply_peft, save_adapter, unload

    lm = load_model(model)
    out = {}
    for i in range(k):
        torch.manual_seed(100 + i)
        apply_peft(lm.model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                                        init_lora_weights="random"))
        out[f"lora{i}"] = save_adapter(lm.model, folder / f"lora{i}")
        unload(lm.model)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HTTPProcess:
    """A server in a subprocess; ``base`` is its loopback URL once ``/health`` answers."""

    def __init__(self, cmd: list[str], port: int, what: str, seconds: int, **popen: Any):
        self.base = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen(cmd, **popen)
        for _ in range(seconds * 4):
            if self.proc.poll() is not None:
                raise SystemExit(f"{what} exited with {self.proc.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.close()
        raise SystemExit(f"{what} did not come up in {seconds} s")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


class Server(HTTPProcess):
    """``slimlm serve`` in a subprocess; ``base`` is its URL once ``/health`` answers."""

    def __init__(self, model: str, adapters: dict[str, Path], extra: list[str], threads: int | None = None):
        port = free_port()
        cmd = [sys.executable, "-m", "slimlm.cli.main", "serve", model, "--port", str(port), "--served-model-name",
               "base", *extra]
        for name, path in adapters.items():
            cmd += ["--adapter", f"{name}={path}"]
        if threads:
            cmd += ["--threads", str(threads)]
        super().__init__(cmd, port, "slimlm serve", 300, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})

    def metric(self, name: str) -> float:
        for line in httpx.get(self.base + "/metrics", timeout=30).text.splitlines():
            if line.startswith(f"slimlm_{name} "):
                return float(line.split()[1])
        raise KeyError(name)


async def one_request(client: httpx.AsyncClient, base: str, body: dict[str, Any], stream: bool,
                      cancel: bool) -> dict[str, Any]:
    """One completion (a chat completion when ``body`` has ``messages``); returns text, timings (TTFT,
    inter-token gaps) and status. Streamed token counts come from ``include_usage`` where the server
    sends it (a token that decodes to no text yet has no chunk of its own); stamps are taken only at
    chunks that carry text, so a chat stream's opening role chunk is not a first token."""
    chat = "messages" in body
    path = "/v1/chat/completions" if chat else "/v1/completions"

    def piece(choice: dict[str, Any]) -> str:
        return (choice.get("delta", {}).get("content") if chat else choice.get("text")) or ""

    t0 = time.perf_counter()
    if not stream:
        r = await client.post(base + path, json=body)
        res: dict[str, Any] = {"status": r.status_code, "latency": time.perf_counter() - t0}
        if r.status_code == 200:
            j = r.json()
            c0 = j["choices"][0]
            res.update(text=c0["message"]["content"] if chat else c0["text"], model=j["model"],
                       tokens=j["usage"]["completion_tokens"])
        else:
            res["error"] = r.text
        return res
    text, stamps, model, usage = "", [], None, None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", base + path, json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode()}
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                ch = json.loads(line[6:])
                model = ch.get("model", model)
                if ch.get("usage"):
                    usage = ch["usage"].get("completion_tokens", usage)
                t = piece(ch["choices"][0]) if ch.get("choices") else ""
                if t:
                    stamps.append(time.perf_counter() - t0)
                    text += t
                    if cancel:
                        return {"status": 200, "cancelled": True}
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"status": 200, "text": text, "model": model, "ttft": stamps[0] if stamps else None, "gaps": gaps,
            "latency": time.perf_counter() - t0, "tokens": usage if usage is not None else len(stamps)}


async def run_load(base: str, bodies: list[dict[str, Any]], concurrency: int, stream_every: int = 3,
                   cancel_every: int = 0) -> tuple[list[dict[str, Any]], float]:
    sem = asyncio.Semaphore(concurrency)

    async def go(i: int, client: httpx.AsyncClient) -> dict[str, Any]:
        stream = stream_every > 0 and i % stream_every == 0
        cancel = stream and cancel_every > 0 and (i // stream_every) % cancel_every == 0
        async with sem:
            try:
                return await one_request(client, base, bodies[i], stream, cancel)
            except httpx.HTTPError as e:
                return {"status": -1, "error": repr(e)}

    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        out = await asyncio.gather(*(go(i, client) for i in range(len(bodies))))
    return list(out), time.perf_counter() - t0


def next_alone(eng: Any, ids: list[int], adapter: str | None, k: int = 5) -> list[tuple[int, float]]:
    """The ``k`` most likely next tokens after ``ids`` (log-probabilities, most likely first) from the
    offline engine running this one request alone."""
    rid = eng.add_request(ids, SamplingConfig(max_new_tokens=1, ignore_eos=True), logprobs=k, adapter=adapter)
    lps = None
    while eng.has_unfinished():
        for o in eng.step():
            if o.request_id == rid and o.finished:
                lps = o.logprobs
    assert lps, "the engine returned no logprobs"
    return lps[0].top


def walk_greedy(eng: Any, tok: Any, prompt: list[int], adapter: str | None, n: int, got: str,
                tol: float) -> tuple[bool, float]:
    """Is ``got`` (the server's text) an ``n``-token greedy continuation of ``prompt``, where a step may
    take any token within ``tol`` (log-probability) of the most likely one? The server batches each
    request with whatever else is running, and batched quantized kernels round differently from the
    same request alone, so a near-tie can flip; another request's answer (a mixed-up response) or a
    truncated one cannot pass. Returns (passes, the largest gap a step took)."""
    ids: list[int] = []
    worst = 0.0
    for _ in range(n):
        top = next_alone(eng, prompt + ids, adapter)
        pick = next(((t, top[0][1] - lp) for t, lp in top
                     if top[0][1] - lp <= tol and got.startswith(tok.decode(ids + [t]).rstrip("\ufffd"))), None)
        if pick is None:
            return False, worst
        ids.append(pick[0])
        worst = max(worst, pick[1])
    return tok.decode(ids) == got, worst


def cancel_frees_at_once(srv: Server, model: str) -> float:
    """Seconds from closing a running stream until ``kv_blocks_used`` is 0 again."""
    body = {"model": model, "prompt": [7, 8, 9, 10], "max_tokens": 400, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", srv.base + "/v1/completions", json=body, timeout=120) as r:
        lines = r.iter_lines()
        for _ in range(3):
            next(lines)
        assert srv.metric("kv_blocks_used") > 0
    t0 = time.perf_counter()
    while srv.metric("kv_blocks_used") > 0:
        if time.perf_counter() - t0 > 30:
            return float("inf")
        time.sleep(0.01)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of --model (smoke run)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--lora", type=int, default=2, help="random LoRA adapters requests pick from (0: base only)")
    ap.add_argument("--max-tokens", type=int, default=12, help="most tokens per answer (each 1..this)")
    ap.add_argument("--cancel-every", type=int, default=7, help="close every k-th stream after its first chunk")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tol", type=float, default=0.5,
                    help="log-probability gap a server answer may take from the request's greedy token alone")
    ap.add_argument("--dequantize", action="store_true",
                    help="GGUF: serve (and check against) the de-quantized float model, whose batched and "
                         "single-request kernels round alike, so answers are compared exactly (--tol 1e-3)")
    ap.add_argument("--out", default="benchmarks/results/load_test.json")
    args = ap.parse_args()
    from slimlm.engine.llm import LLM
    from slimlm.loaders import load_model

    tmp = Path(tempfile.mkdtemp(prefix="slimlm-load-"))
    model = tiny_model(tmp / "tiny") if args.tiny else args.model
    adapters = random_adapters(model, args.lora, tmp) if args.lora else {}
    lm = load_model(model, dequantize=args.dequantize or None)
    rng = random.Random(0)
    vocab = lm.config.vocab_size
    names = ["base", *adapters]
    reqs = [([rng.randrange(3, vocab) for _ in range(rng.randint(4, 48))], rng.randint(1, args.max_tokens),
             names[i % len(names)]) for i in range(args.requests)]
    print(f"expected answers: the offline engine on {len(reqs)} requests ...", flush=True)
    llm = LLM(lm)
    for name, path in adapters.items():
        llm.engine.add_adapter(name, path)
    want = [o.text for o in llm.generate([p for p, _, _ in reqs],
                                         [SamplingConfig(max_new_tokens=n, ignore_eos=True) for _, n, _ in reqs],
                                         adapters=[None if m == "base" else m for _, _, m in reqs])]
    bodies = [{"model": m, "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True} for p, n, m in reqs]
    srv = Server(model, adapters, ["--max-num-seqs", str(args.concurrency), *(["--dequantize"] if args.dequantize else [])],
                 args.threads)
    try:
        got, wall = asyncio.run(run_load(srv.base, bodies, args.concurrency, 3, args.cancel_every))
        t0 = time.perf_counter()
        while (srv.metric("kv_blocks_used") > 0 or srv.metric("requests_running") > 0) and time.perf_counter() - t0 < 30:
            time.sleep(0.05)
        blocks_end = srv.metric("kv_blocks_used")
        free_s = cancel_frees_at_once(srv, names[-1])
        alive = httpx.get(srv.base + "/health").status_code == 200
    finally:
        srv.close()
        shutil.rmtree(tmp, ignore_errors=True)
    errors = [i for i, g in enumerate(got) if g["status"] != 200]
    cancelled = [i for i, g in enumerate(got) if g.get("cancelled")]
    differ = [i for i, g in enumerate(got) if g["status"] == 200 and not g.get("cancelled")
              and (g.get("text") != want[i] or g.get("model") != reqs[i][2])]
    print(f"{len(differ)} answers differ from the offline batch's text: walking each alone (tolerance {args.tol}) ...",
          flush=True)
    wrong, gaps = [], []
    for i in differ:
        ok_i, gap = (got[i].get("model") == reqs[i][2], 0.0)
        if ok_i:
            ok_i, gap = walk_greedy(llm.engine, lm.tokenizer, reqs[i][0], None if reqs[i][2] == "base" else reqs[i][2],
                                    reqs[i][1], got[i]["text"], args.tol)
        gaps.append(gap)
        if not ok_i:
            wrong.append(i)
    # control: the same walk must reject an answer checked against another request's prompt (what a
    # mixed-up response is); up to 20 answers of 4 or more tokens that decode to valid text (U+FFFD
    # hides which bytes a token had), each against the next request of its length whose answer differs
    control = [(i, j) for i in dict.fromkeys([*differ, *range(len(got))])
               if got[i].get("text") and reqs[i][1] >= 4 and "\ufffd" not in got[i]["text"]
               for j in [next((j for j in range(i + 1, len(reqs))
                               if reqs[j][1] == reqs[i][1] and want[j] != got[i]), -1)] if j >= 0][:20]
    passed = [{"answer": i, "checked_against": j, "text": got[i]["text"], "its_own": want[j]} for i, j in control
              if walk_greedy(llm.engine, lm.tokenizer, reqs[j][0], None if reqs[j][2] == "base" else reqs[j][2],
                             reqs[j][1], got[i]["text"], args.tol)[0]]
    rejected = len(control) - len(passed)
    out_tokens = sum(g.get("tokens", 0) for g in got)
    ttfts = sorted(g["ttft"] for g in got if g.get("ttft") is not None)
    res = {"model": model, "dequantized": args.dequantize, "requests": len(reqs), "concurrency": args.concurrency, "adapters": len(adapters),
           "errors": len(errors), "mismatched": len(wrong), "cancelled": len(cancelled),
           "exact": len(got) - len(errors) - len(cancelled) - len(differ), "near_tie_flips": len(differ) - len(wrong),
           "largest_flip_gap": max(gaps, default=0.0), "tolerance": args.tol,
           "control_swapped": len(control), "control_rejected": rejected, "control_passed": passed,
           "blocks_used_at_end": blocks_end, "cancel_frees_blocks_s": free_s, "server_alive": alive,
           "wall_s": wall, "requests_per_s": len(reqs) / wall, "output_tokens_per_s": out_tokens / wall,
           "median_ttft_s": ttfts[len(ttfts) // 2] if ttfts else None,
           "first_errors": [got[i].get("error") for i in errors[:3]],
           "first_mismatches": [{"i": i, "want": want[i], "got": got[i].get("text")} for i in wrong[:3]],
           "system": system_info()}
    save_json(res, args.out)
    print(json.dumps({k: v for k, v in res.items() if k != "system"}, indent=1))
    ok = not errors and not wrong and blocks_end == 0 and free_s < 1.0 and alive and rejected == len(control)
    print("PASS" if ok else "FAIL")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
