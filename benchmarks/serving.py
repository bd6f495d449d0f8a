"""Serving benchmark over loopback against ``slimlm serve``, in ``vllm bench serve``'s metrics.

Each row sends ``--requests`` streamed greedy completions (``ignore_eos``, so every answer has exactly
``--new-tokens`` tokens; token-id prompts of ``--prompt-len``) ``--concurrency`` at a time, and
reports TTFT, TPOT and ITL (mean / median / p99, seconds), request and output throughput.

Rows so far (issue 20 item 8):

- ``base``: the plain server (no adapter loaded).
- ``lora8-mixed``: the server with ``--lora`` (8) random rank-``--rank`` LoRA adapters on q/k/v/o,
  request i naming adapter ``i % 8``: every step mixes all of them (acceptance: output tokens/s
  >= 0.85x ``base``).
- ``lora8-server-base``: the same adapter-carrying server, requests naming the base model (the cost
  of wrapped linears when no adapter runs).

The full run on a quiet machine::

    .venv/bin/python benchmarks/serving.py --model smollm2-135m --requests 64 --concurrency 16 --new-tokens 64

Smallest run (a tiny random model)::

    .venv/bin/python benchmarks/serving.py --tiny --requests 8 --concurrency 4 --new-tokens 8 --lora 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load_test import Server, random_adapters, run_load, tiny_model  # noqa: E402

from slimlm.bench.sysinfo import save_json, system_info  # noqa: E402


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"mean": None, "median": None, "p99": None}
    s = sorted(xs)
    return {"mean": statistics.fmean(s), "median": statistics.median(s), "p99": s[min(len(s) - 1, int(0.99 * len(s)))]}


def summarize(got: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    ok = [g for g in got if g["status"] == 200 and g.get("ttft") is not None]
    tpot = [(g["latency"] - g["ttft"]) / (g["tokens"] - 1) for g in ok if g["tokens"] > 1]
    out_tokens = sum(g["tokens"] for g in ok)
    return {"completed": len(ok), "errors": len(got) - len(ok), "wall_s": wall,
            "request_throughput": len(ok) / wall, "output_throughput": out_tokens / wall,
            "ttft_s": _stats([g["ttft"] for g in ok]), "tpot_s": _stats(tpot),
            "itl_s": _stats([x for g in ok for x in g["gaps"]])}


def bench(srv: Server, models: list[str], prompts: list[list[int]], new_tokens: int, concurrency: int) -> dict[str, Any]:
    bodies = [{"model": models[i % len(models)], "prompt": p, "max_tokens": new_tokens, "temperature": 0,
               "ignore_eos": True} for i, p in enumerate(prompts)]
    asyncio.run(run_load(srv.base, bodies[:concurrency], concurrency, stream_every=1))  # warm-up
    got, wall = asyncio.run(run_load(srv.base, bodies, concurrency, stream_every=1))
    return summarize(got, wall)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of --model (smoke run)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--lora", type=int, default=8, help="adapters mixed in the lora rows")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/serving.json")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="slimlm-serving-"))
    rows: dict[str, Any] = {}
    try:
        model = tiny_model(tmp / "tiny") if args.tiny else args.model
        from slimlm.loaders import load_model

        vocab = load_model(model).config.vocab_size
        rng = random.Random(0)
        prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
        flags = ["--max-num-seqs", str(args.concurrency)]
        srv = Server(model, {}, flags, args.threads)
        try:
            rows["base"] = bench(srv, ["base"], prompts, args.new_tokens, args.concurrency)
        finally:
            srv.close()
        adapters = random_adapters(model, args.lora, tmp, args.rank)
        srv = Server(model, adapters, flags, args.threads)
        try:
            rows[f"lora{args.lora}-mixed"] = bench(srv, list(adapters), prompts, args.new_tokens, args.concurrency)
            rows[f"lora{args.lora}-server-base"] = bench(srv, ["base"], prompts, args.new_tokens, args.concurrency)
        finally:
            srv.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base_tps = rows["base"]["output_throughput"]
    for r in rows.values():
        r["vs_base_output_throughput"] = r["output_throughput"] / base_tps
    res = {"model": args.model if not args.tiny else "tiny-random-llama", "requests": args.requests,
           "concurrency": args.concurrency, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
           "lora_rank": args.rank, "rows": rows, "system": system_info()}
    save_json(res, args.out)
    for name, r in rows.items():
        print(f"{name:22s} out tok/s {r['output_throughput']:8.1f} ({r['vs_base_output_throughput']:.2f}x base)  "
              f"TTFT med {r['ttft_s']['median']:.3f}s  TPOT med {r['tpot_s']['median'] or 0:.4f}s  errors {r['errors']}")
    print(json.dumps({k: v["vs_base_output_throughput"] for k, v in rows.items()}))


if __name__ == "__main__":
    main()
