"""Offline engine throughput: N requests at once through ``LLM.generate`` vs the same requests one by one.

Same model, prompts and lengths (greedy, EOS ignored, so every request makes exactly its tokens).
Three ways, interleaved over ``--repeats`` rounds, median reported: slimlm's batch-1 ``generate``
(contiguous cache + the C++ decode kernels) one request at a time, the engine one request at a time,
and the engine with all requests at once (continuous batching, paged KV). Also checks that the
batched tokens equal the one-by-one tokens. Output tokens per second and the ratios; JSON saved.

    .venv/bin/python benchmarks/engine_offline.py --requests 16 --new-tokens 32
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
from slimlm.engine.generate import generate  # noqa: E402
from slimlm.engine.llm import LLM  # noqa: E402
from slimlm.engine.sampling import SamplingConfig  # noqa: E402
from slimlm.engine.scheduler import SchedulerConfig  # noqa: E402
from slimlm.loaders import load_model  # noqa: E402

TOPICS = ["a cat", "the sea", "a robot", "winter", "a city at night", "an old map", "a violin", "the moon"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/engine_offline.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    tok = lm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Write a short poem about "
                                                    f"{TOPICS[i % len(TOPICS)]} (number {i})."}]))
               for i in range(args.requests)]
    pr = SamplingConfig(max_new_tokens=args.new_tokens, ignore_eos=True)
    llm = LLM(lm, SchedulerConfig(kv_budget_gib=0.5, max_num_seqs=max(args.requests, 1)))
    n_out = args.requests * args.new_tokens
    times: dict[str, list[float]] = {"generate_one_by_one": [], "engine_one_by_one": [], "engine_batched": []}
    same = True
    for _ in range(args.repeats):
        t = time.perf_counter()
        ref = [generate(lm.model, tok, [p], pr).tokens[0] for p in prompts]
        times["generate_one_by_one"].append(time.perf_counter() - t)
        t = time.perf_counter()
        for p in prompts:
            llm.generate([p], pr)
        times["engine_one_by_one"].append(time.perf_counter() - t)
        t = time.perf_counter()
        outs = llm.generate(prompts, pr)
        times["engine_batched"].append(time.perf_counter() - t)
        same = same and all(o.token_ids == r for o, r in zip(outs, ref, strict=True))
    med = {k: statistics.median(v) for k, v in times.items()}
    tps = {k: n_out / v for k, v in med.items()}
    res = {"model": args.model, "requests": args.requests, "new_tokens": args.new_tokens, "repeats": args.repeats,
           "output_tokens_per_s": tps, "batched_vs_generate": tps["engine_batched"] / tps["generate_one_by_one"],
           "batched_vs_engine_one": tps["engine_batched"] / tps["engine_one_by_one"],
           "batched_tokens_equal_one_by_one": same, "system": system_info()}
    for k, v in tps.items():
        print(f"{k:>22}: {v:8.1f} output tok/s")
    print(f"batched / generate one-by-one: {res['batched_vs_generate']:.2f}x; batched / engine one-by-one: "
          f"{res['batched_vs_engine_one']:.2f}x; same tokens: {same}")
    print(f"saved {save_json(res, args.out)}")


if __name__ == "__main__":
    main()
