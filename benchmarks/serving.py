"""Serving benchmark over loopback against ``slimlm serve``, in ``vllm bench serve``'s metrics.

Each row sends streamed greedy completions (``ignore_eos``, so every answer has its exact token count)
a fixed number at a time and reports TTFT, TPOT and ITL (mean / median / p99, seconds), request and
output throughput (output tokens counted by ``stream_options.include_usage``). Row groups
(``--rows``, issue 20 item 8):

- ``sweep``: ``--requests`` completions with mixed prompt and output lengths (prompt 0.5-1.5x
  ``--prompt-len`` tokens, output 0.5-1.5x ``--new-tokens``, fixed seed) at each concurrency of
  ``--sweep``; ``base-c1`` is the same requests one by one (acceptance: 16 concurrent >= 8x its
  output tokens/s).
- ``lora``: the server with ``--lora`` (8) random rank-``--rank`` LoRA adapters on q/k/v/o at
  ``--concurrency``, request i naming adapter ``i % 8`` so every step mixes them (acceptance: output
  tokens/s >= 0.85x ``base``, the plain server on the same fixed-length requests); and
  ``lora8-server-base``, the adapter-carrying server answering base-model requests.
- ``prefix``: 9 requests one by one (after one warm-up) sharing a 1,024-token system prompt (then 16
  tokens of their own, 8 new tokens), with and without ``--prefix-caching`` (acceptance: median TTFT >= 5x lower).
- ``spec``: chat requests one by one, ``--spec ngram`` and ``--spec self`` vs ``--spec off``: an
  input-grounded task (correct the spelling of a given passage, so the answer copies it) and open
  chat (acceptance: ngram >= 1.5x tokens/s on the first, never below 0.95x on the second); the
  acceptance rate and tokens per step come from ``/metrics``.
- ``llama``: the ``sweep`` load against llama.cpp's ``llama-server -np C`` (continuous batching) on the
  same GGUF file (``--llama-server PATH``; needs ``--model`` to be a GGUF, as the default alias is).
  slimlm serves that file natively, so both run the same bits.

The full run on a quiet machine (llama.cpp built from the ``llama-cpp-python`` sdist, see
``benchmarks/vs_llamacpp.py``)::

    .venv/bin/python benchmarks/serving.py --model smollm2-135m --llama-server /path/to/llama.cpp/build/bin/llama-server

Smallest run (a tiny random model; no llama row)::

    .venv/bin/python benchmarks/serving.py --tiny --requests 8 --concurrency 4 --sweep 1,4 --new-tokens 8 --lora 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from load_test import HTTPProcess, Server, free_port, random_adapters, run_load, tiny_model  # noqa: E402

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


# An original passage with spelling mistakes: correcting it means copying almost all of it, the
# input-grounded case prompt lookup is made for.
PASSAGE = ("The small town of Alderbrook sits at the bend of a slow river, where the old stone bridge "
           "has stood for more then three hundred years. Every spring the farmers bring there sheep "
           "across it to the high meadows, and every autumn they bring them back again before the "
           "first snow. The bakery on the market square opens at five in the morning, and by six the "
           "smell of fresh bread reaches the school, the libary and the little railway station. "
           "Visitors often say that nothing ever changes in Alderbrook, but the people who live there "
           "know better: the river moves its banks a little every year, the bridge needs new mortar "
           "every decade, and the children who once fed the ducks now run the shops themselves.")
GROUNDED = [f"Correct the spelling mistakes in the following text and write out the whole corrected text.\n\n{PASSAGE}",
            f"Copy the following text exactly, word for word.\n\n{PASSAGE}"]
OPEN_CHAT = ["Tell me a short story about a lighthouse keeper.", "What are some good habits for learning a new language?",
             "Describe your ideal weekend.", "Why do people enjoy music?"]


def bench(base: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """One row: a warm-up of ``concurrency`` requests, then all ``bodies`` streamed, that many at a time."""
    asyncio.run(run_load(base, bodies[:concurrency], concurrency, stream_every=1))
    got, wall = asyncio.run(run_load(base, bodies, concurrency, stream_every=1))
    return summarize(got, wall)


def completions(models: list[str], prompts: list[list[int]], new: list[int]) -> list[dict[str, Any]]:
    return [{"model": models[i % len(models)], "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}
            for i, (p, n) in enumerate(zip(prompts, new, strict=True))]


def mixed_load(vocab: int, n: int, prompt_len: int, new_tokens: int) -> tuple[list[list[int]], list[int]]:
    """``n`` token-id prompts of 0.5-1.5x ``prompt_len`` tokens with 0.5-1.5x ``new_tokens`` each (seed 1)."""
    rng = random.Random(1)
    lens = [rng.randint(max(1, prompt_len // 2), prompt_len * 3 // 2) for _ in range(n)]
    return ([[rng.randrange(3, vocab) for _ in range(k)] for k in lens],
            [rng.randint(max(2, new_tokens // 2), new_tokens * 3 // 2) for _ in range(n)])


class LlamaServer(HTTPProcess):
    """llama.cpp's ``llama-server`` on ``gguf`` with ``slots`` parallel slots (continuous batching)."""

    def __init__(self, binary: str, gguf: str, slots: int, ctx_per_slot: int, threads: int):
        port = free_port()
        cmd = [binary, "-m", gguf, "--port", str(port), "-np", str(slots), "-c", str(slots * ctx_per_slot),
               "-t", str(threads), "-tb", str(threads), "--cont-batching", "--no-webui"]
        super().__init__(cmd, port, "llama-server", 150, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def sweep_rows(model: str, vocab: int, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    prompts, new = mixed_load(vocab, args.requests, args.prompt_len, args.new_tokens)
    rows: dict[str, Any] = {}
    levels = [int(c) for c in args.sweep.split(",")]
    srv = Server(model, {}, ["--max-num-seqs", str(max(levels))], args.threads)
    try:
        for c in levels:
            rows[f"base-c{c}"] = bench(srv.base, completions(["base"], prompts, new), c)
            print(f"base-c{c}: {rows[f'base-c{c}']['output_throughput']:.1f} out tok/s", flush=True)
    finally:
        srv.close()
    if args.llama_server:
        if not model.endswith(".gguf"):
            raise SystemExit("error: --llama-server needs --model to be a GGUF file or the default alias")
        ctx = (args.prompt_len * 3 // 2 + args.new_tokens * 3 // 2 + 64)
        for c in levels:
            ls = LlamaServer(args.llama_server, model, c, ctx, threads)
            try:
                rows[f"llama-server-np{c}"] = bench(ls.base, completions(["base"], prompts, new), c)
                print(f"llama-server-np{c}: {rows[f'llama-server-np{c}']['output_throughput']:.1f} out tok/s", flush=True)
            finally:
                ls.close()
    return rows


def lora_rows(model: str, vocab: int, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    new = [args.new_tokens] * args.requests
    flags = ["--max-num-seqs", str(args.concurrency)]
    rows: dict[str, Any] = {}
    srv = Server(model, {}, flags, args.threads)
    try:
        rows["base"] = bench(srv.base, completions(["base"], prompts, new), args.concurrency)
    finally:
        srv.close()
    adapters = random_adapters(model, args.lora, tmp, args.rank)
    srv = Server(model, adapters, flags, args.threads)
    try:
        rows[f"lora{args.lora}-mixed"] = bench(srv.base, completions(list(adapters), prompts, new), args.concurrency)
        rows[f"lora{args.lora}-server-base"] = bench(srv.base, completions(["base"], prompts, new), args.concurrency)
    finally:
        srv.close()
    for r in rows.values():
        r["vs_base_output_throughput"] = r["output_throughput"] / rows["base"]["output_throughput"]
    return rows


def prefix_rows(model: str, vocab: int, ctx: int, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(2)
    system = [rng.randrange(3, vocab) for _ in range(min(1024, ctx - 64))]  # 1,024 unless the context is short
    prompts = [system + [rng.randrange(3, vocab) for _ in range(16)] for _ in range(9)]
    rows: dict[str, Any] = {}
    for name, flag in (("prefix-caching", "--prefix-caching"), ("prefix-none", "--no-prefix-caching")):
        srv = Server(model, {}, [flag, "--max-num-seqs", "4"], args.threads)
        try:
            rows[name] = bench(srv.base, completions(["base"], prompts, [8] * len(prompts)), 1)
            rows[name]["prefix_cache_hit_rate"] = srv.metric("prefix_cache_hit_rate")
        finally:
            srv.close()
    return rows


def spec_rows(model: str, args: argparse.Namespace) -> dict[str, Any]:
    """Plain, n-gram and self speculation on each task: the three servers run side by side (one busy
    at a time) and take turns for ``--spec-reps`` rounds, so machine drift hits every row alike; a
    row's throughput is its median round."""
    rows: dict[str, Any] = {}
    tasks = {"grounded": GROUNDED, "open": OPEN_CHAT}
    specs = ("off", "ngram", "self")
    servers = {}
    try:
        for spec in specs:
            servers[spec] = Server(model, {}, ["--spec", spec, "--max-num-seqs", "4"], args.threads)
        rounds: dict[str, list[dict[str, Any]]] = {}
        for _ in range(args.spec_reps):
            for task, msgs in tasks.items():
                bodies = [{"model": "base", "messages": [{"role": "user", "content": m}],
                           "max_tokens": args.spec_tokens, "temperature": 0} for m in msgs]
                for spec, srv in servers.items():
                    before = (srv.metric("spec_draft_tokens_total"), srv.metric("spec_accepted_tokens_total"))
                    r = bench(srv.base, bodies, 1)
                    drafted = srv.metric("spec_draft_tokens_total") - before[0]
                    r["spec_acceptance_rate"] = ((srv.metric("spec_accepted_tokens_total") - before[1]) / drafted
                                                 if drafted else None)
                    rounds.setdefault(f"spec-{spec}-{task}", []).append(r)
    finally:
        for srv in servers.values():
            srv.close()
    for name, rs in rounds.items():
        rs = sorted(rs, key=lambda r: r["output_throughput"])
        rows[name] = {**rs[len(rs) // 2], "rounds_output_throughput": [r["output_throughput"] for r in rs]}
    for spec in ("ngram", "self"):
        for task in tasks:
            r = rows[f"spec-{spec}-{task}"]
            r["vs_off_output_throughput"] = r["output_throughput"] / rows[f"spec-off-{task}"]["output_throughput"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of --model (smoke run)")
    ap.add_argument("--rows", default="sweep,lora,prefix,spec", help="row groups to run (see the module docstring)")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16, help="concurrency of the lora rows")
    ap.add_argument("--sweep", default="1,4,16,32", help="concurrencies of the sweep rows")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--lora", type=int, default=8, help="adapters mixed in the lora rows")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--spec-tokens", type=int, default=128, help="max_tokens of the spec rows' chat requests")
    ap.add_argument("--spec-reps", type=int, default=3, help="rounds of the spec rows (median)")
    ap.add_argument("--llama-server", default="", help="llama.cpp's llama-server binary: adds the llama rows")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/serving.json")
    args = ap.parse_args()
    groups = set(args.rows.split(","))
    unknown = groups - {"sweep", "lora", "prefix", "spec"}
    if unknown:
        raise SystemExit(f"error: unknown --rows {sorted(unknown)} (choose from sweep, lora, prefix, spec)")
    threads = args.threads or torch.get_num_threads()
    tmp = Path(tempfile.mkdtemp(prefix="slimlm-serving-"))
    rows: dict[str, Any] = {}
    try:
        model = tiny_model(tmp / "tiny") if args.tiny else args.model
        from slimlm.loaders import load_model
        from slimlm.loaders.resolve import resolve

        if not args.tiny:
            model = str(resolve(model)[0])
        cfg = load_model(model).config
        vocab = cfg.vocab_size
        if "sweep" in groups:
            rows.update(sweep_rows(model, vocab, args, threads))
        if "lora" in groups:
            rows.update(lora_rows(model, vocab, args, tmp))
        if "prefix" in groups:
            rows.update(prefix_rows(model, vocab, cfg.max_position_embeddings, args))
        if "spec" in groups and not args.tiny:  # the tiny model has no chat template
            rows.update(spec_rows(model, args))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = derived(rows, args.sweep)
    res = {"model": args.model if not args.tiny else "tiny-random-llama", "requests": args.requests,
           "concurrency": args.concurrency, "new_tokens": args.new_tokens, "prompt_len": args.prompt_len,
           "lora_rank": args.rank, "threads": threads, "rows": rows, "ratios": ratios, "system": system_info()}
    save_json(res, args.out)
    for name, r in rows.items():
        print(f"{name:26s} out tok/s {r['output_throughput']:8.1f}  TTFT med {r['ttft_s']['median'] or 0:.3f}s  "
              f"TPOT med {r['tpot_s']['median'] or 0:.4f}s  errors {r['errors']}")
    print(json.dumps(ratios, indent=1))


def derived(rows: dict[str, Any], sweep: str) -> dict[str, float]:
    """The acceptance ratios the rows present allow."""
    out: dict[str, float] = {}
    tps = {k: v["output_throughput"] for k, v in rows.items()}
    for c in (int(x) for x in sweep.split(",")):
        if f"base-c{c}" in tps and "base-c1" in tps and c != 1:
            out[f"c{c}_vs_one_by_one"] = tps[f"base-c{c}"] / tps["base-c1"]
        if f"llama-server-np{c}" in tps and f"base-c{c}" in tps:
            out[f"c{c}_vs_llama_server"] = tps[f"base-c{c}"] / tps[f"llama-server-np{c}"]
            out[f"c{c}_tpot_vs_llama_server"] = (rows[f"base-c{c}"]["tpot_s"]["median"]
                                                 / rows[f"llama-server-np{c}"]["tpot_s"]["median"])
    for k in [k for k in rows if k.startswith("lora") and k.endswith("-mixed")]:
        out[f"{k}_vs_base"] = rows[k]["vs_base_output_throughput"]
    if "prefix-caching" in rows and "prefix-none" in rows:
        out["prefix_ttft_reduction"] = rows["prefix-none"]["ttft_s"]["median"] / rows["prefix-caching"]["ttft_s"]["median"]
    for k, v in rows.items():
        if "vs_off_output_throughput" in v:
            out[f"{k}_vs_off"] = v["vs_off_output_throughput"]
    return out


if __name__ == "__main__":
    main()
