"""KV cache policies on SmolLM2: bytes per token, int8/int4 perplexity cost, a StreamingLLM long stream.

1. **KV bytes per token** per policy, counted from the tensors each cache holds, vs a contiguous cache
   preallocated for the model's whole context (what ``generate`` and earlier servers allocate): for a
   request of ``--request-tokens`` tokens, bytes held per token actually used (the waste ratio).
2. **Perplexity cost** of int8 / int4 KV on WikiText-2 (test split, the first ``--ppl-tokens`` tokens,
   ``--seq-len`` windows, GPTQ protocol): each window runs through the policy's cache (acceptance:
   int8 halves the bytes at <= 1% perplexity).
3. **StreamingLLM**: one stream of ``--stream-tokens`` WikiText-2 tokens (default 20,000, past
   SmolLM2's 8,192 context) through ``streaming:SINKS:WINDOW`` (default 4 + 1,020), ``--chunk`` tokens
   per forward (1 = exact StreamingLLM); perplexity over the last ``--score-last`` (4,000) predictions
   vs a fresh ``sinks + window``-token window's (the default protocol over the same tail of the stream)
   and the KV bytes held (acceptance: within 10%, constant memory).

Full run (quiet machine; the stream is the slow part: one forward per token):

    .venv/bin/python benchmarks/kv_policies.py

Smoke run (seconds-to-minutes):

    .venv/bin/python benchmarks/kv_policies.py --ppl-tokens 1024 --seq-len 256 --stream-tokens 400 \\
        --score-last 100 --window 60 --chunk 8 --out /tmp/kv_policies.json
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimlm.bench.sysinfo import save_json, system_info  # noqa: E402
from slimlm.engine.paged_cache import Int8PagedKVCache, PagedKVCache  # noqa: E402
from slimlm.eval.perplexity import evaluate_perplexity, evaluate_stream  # noqa: E402
from slimlm.loaders import load_model  # noqa: E402
from slimlm.models.kv_policy import KVPolicy, make_cache  # noqa: E402

WIKI = next((p / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw" for p in (ROOT.parent, ROOT.parent.parent)
             if (p / "shared" / "data").is_dir()), ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw")


def kv_bytes(model, request_tokens: int, streaming: KVPolicy, block_size: int = 16) -> list[dict[str, object]]:  # type: ignore[no-untyped-def]
    """Bytes held per policy for one request of ``request_tokens`` (contiguous caches sized for the
    whole context, paged ones for the request's blocks, streaming for its window)."""
    cfg = model.config
    ctx = cfg.max_position_embeddings
    rows: list[dict[str, object]] = []

    def row(name: str, held: int, note: str) -> None:
        rows.append({"policy": name, "bytes_held": held, "bytes_per_used_token": held / request_tokens, "note": note})

    for dt, label in ((model.dtype, str(model.dtype).replace("torch.", "")), (torch.bfloat16, "bfloat16")):
        c = make_cache("full", model, 1, ctx, dt)
        row(f"full contiguous {label} (max length {ctx})", c.nbytes, "preallocated for the whole context")
    for p in ("int8", "int4"):
        c = make_cache(p, model, 1, ctx, torch.bfloat16)
        row(f"{p} contiguous (max length {ctx})", c.nbytes, "preallocated for the whole context")
    blocks = -(-request_tokens // block_size)
    for cls, label in ((PagedKVCache, "full paged bf16"), (Int8PagedKVCache, "int8 paged")):
        c = cls.for_model(cfg, blocks, block_size, torch.bfloat16)
        row(f"{label} ({blocks} blocks of {block_size})", c.nbytes, "only the request's blocks")
    c = make_cache(streaming, model, 1, 0, torch.bfloat16)
    row(f"{streaming} bf16", c.nbytes, "constant however long the stream")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(WIKI))
    ap.add_argument("--request-tokens", type=int, default=1024)
    ap.add_argument("--ppl-tokens", type=int, default=20480)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--stream-tokens", type=int, default=20000)
    ap.add_argument("--score-last", type=int, default=4000)
    ap.add_argument("--sinks", type=int, default=4)
    ap.add_argument("--window", type=int, default=1020)
    ap.add_argument("--chunk", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="benchmarks/results/kv_policies.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    model = lm.model
    ids = lm.tokenizer.encode(Path(args.data).read_text())
    streaming = KVPolicy(method="streaming", sinks=args.sinks, window=args.window)
    out: dict[str, object] = {"system": system_info(), "model": args.model, "load": "see the note below"}

    rows = kv_bytes(model, args.request_tokens, streaming)
    out["kv_bytes"] = rows
    for r in rows:
        print(f"{r['policy']:<48} {r['bytes_held'] / 2**20:9.2f} MiB  {r['bytes_per_used_token']:10.0f} B per token "
              f"of a {args.request_tokens}-token request")
    bf16 = next(r for r in rows if str(r["policy"]).startswith("full contiguous bfloat16"))
    i8 = next(r for r in rows if str(r["policy"]).startswith("int8 contiguous"))
    out["int8_bytes_ratio_vs_bf16"] = int(i8["bytes_held"]) / int(bf16["bytes_held"])  # type: ignore[call-overload]

    ppl: dict[str, float] = {}
    for p in ("full", "int8", "int4"):
        r = evaluate_perplexity(model, ids, seq_len=args.seq_len, max_tokens=args.ppl_tokens, progress=False,
                                kv_policy=KVPolicy.parse(p))
        ppl[p] = r.perplexity
        print(f"wikitext-2 ppl ({args.ppl_tokens} tokens, windows of {args.seq_len}) kv={p}: {r.perplexity:.4f}")
    out["perplexity"] = ppl
    out["int8_ppl_cost"] = ppl["int8"] / ppl["full"] - 1
    out["int4_ppl_cost"] = ppl["int4"] / ppl["full"] - 1
    print(f"int8 KV: {out['int8_bytes_ratio_vs_bf16']:.3f}x bf16 bytes, ppl {100 * out['int8_ppl_cost']:+.2f}% "
          f"(goal <= 1%); int4: ppl {100 * out['int4_ppl_cost']:+.2f}%")

    n = args.stream_tokens + 1  # n tokens give n - 1 predictions
    t0 = time.perf_counter()
    sr = evaluate_stream(model, ids, streaming, score_last=args.score_last, chunk=args.chunk, max_tokens=n,
                         progress=False)
    tail = ids[n - args.score_last - 1 - (args.sinks + args.window):n]  # fresh windows over the same tail
    fresh = evaluate_perplexity(model, tail, seq_len=args.sinks + args.window, progress=False)
    out["stream"] = {"policy": str(streaming), "chunk": args.chunk, **sr.to_dict(),
                     "fresh_window_perplexity": fresh.perplexity, "fresh_tokens_scored": fresh.tokens_scored,
                     "ratio": sr.perplexity / fresh.perplexity, "wall_s": time.perf_counter() - t0,
                     "context": model.config.max_position_embeddings}
    print(f"stream of {sr.tokens_streamed} tokens through {streaming} (chunk {args.chunk}): ppl over the last "
          f"{sr.tokens_scored} = {sr.perplexity:.4f}; fresh {args.sinks + args.window}-token windows over the same "
          f"tail: {fresh.perplexity:.4f} (ratio {sr.perplexity / fresh.perplexity:.3f}, goal <= 1.10); KV held "
          f"{sr.kv_bytes} bytes at the end, at most {sr.kv_bytes_max}")
    out["load"] = "measured on whatever machine ran this; rerun on a quiet machine for timings (sizes/ppl are exact)"
    print(f"saved {save_json(out, args.out)}")


if __name__ == "__main__":
    main()
