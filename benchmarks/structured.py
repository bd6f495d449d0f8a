"""Structured-output overhead: per-token decode time with a ``response_format`` vs unconstrained.

Same model, prompt and number of tokens: a JSON-schema request (greedy) is run once to warm the
mask cache (and once more cold, reported apart), then timed; the unconstrained run generates
exactly as many tokens (EOS ignored). Rounds are interleaved; the median ratio is reported (goal
< 1.10). Also reports the cold index build (vocabulary trie) time. JSON saved.

    .venv/bin/python benchmarks/structured.py --rounds 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimlm.bench.sysinfo import save_json, system_info  # noqa: E402
from slimlm.engine.llm import LLM  # noqa: E402
from slimlm.engine.sampling import SamplingConfig  # noqa: E402
from slimlm.engine.scheduler import SchedulerConfig  # noqa: E402

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 24}, "age": {"type": "integer"}, "city": {"type": "string", "maxLength": 24},
    "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    "employed": {"type": "boolean"}}, "required": ["name", "age", "city", "hobbies", "employed"]}
PROMPT = ("<|im_start|>user\nDescribe a fictional person as JSON with name, age, city, hobbies and employed."
          "<|im_end|>\n<|im_start|>assistant\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/structured.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    llm = LLM(args.model, SchedulerConfig(kv_budget_gib=0.25))
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    t0 = time.perf_counter()
    llm.engine.constraint(fmt)  # builds the vocabulary index
    index_s = time.perf_counter() - t0
    params = SamplingConfig(max_new_tokens=args.max_tokens)
    t0 = time.perf_counter()
    cold = llm.generate([PROMPT], params, response_format=fmt)[0]
    cold_s = time.perf_counter() - t0
    n = len(cold.token_ids)
    free_params = SamplingConfig(max_new_tokens=n, ignore_eos=True)
    rows = []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        con = llm.generate([PROMPT], params, response_format=fmt)[0]
        t_con = time.perf_counter() - t0
        t0 = time.perf_counter()
        free = llm.generate([PROMPT], free_params)[0]
        t_free = time.perf_counter() - t0
        assert len(free.token_ids) == n, (len(free.token_ids), n)
        if con.token_ids != cold.token_ids:
            print("note: warm constrained output differs from the cold one (its prompt now comes from the prefix cache: another float path)")
        rows.append({"constrained_s_per_token": t_con / n, "free_s_per_token": t_free / n, "ratio": t_con / t_free})
    ratio = statistics.median(r["ratio"] for r in rows)
    stats = llm.engine._structured.stats
    print(f"output ({cold.finish_reason}, {n} tokens): {cold.text}")
    print(f"index build {index_s:.2f} s; cold constrained run {cold_s / n * 1e3:.1f} ms/token; mask cache {stats}")
    for r in rows:
        print(f"constrained {r['constrained_s_per_token'] * 1e3:.1f} ms/token, free {r['free_s_per_token'] * 1e3:.1f} "
              f"ms/token, ratio {r['ratio']:.3f}")
    print(f"median per-token ratio constrained/free: {ratio:.3f} (goal < 1.10; shared machine: indicative)")
    save_json({"system": system_info(), "model": args.model, "tokens": n, "index_build_s": index_s,
                         "cold_s_per_token": cold_s / n, "rounds": rows, "median_ratio": ratio,
                         "output": cold.text}, args.out)


if __name__ == "__main__":
    main()
