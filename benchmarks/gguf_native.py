"""GGUF files run natively vs de-quantized: resident memory, prefill and decode speed (SmolLM2 Q4_1).

Each mode loads the model in its own subprocess: the resident set is read after importing torch and
slimlm, building the kernels and a tiny meta-device model (baseline), then after ``load_model`` with the heap trimmed
(``malloc_trim``), so ``model RSS = after - baseline`` is what the model itself holds (the file's
memory map is closed by then; the tokenizer, ~19 MB for SmolLM2's vocabulary, is included). Speed: prefill of ``--prefill`` tokens (one forward, median of
``--rounds``) and greedy decode of ``--tokens`` tokens after a 16-token prompt, batch 1. With
``--llama-bench`` the same file's ``pp``/``tg`` from llama.cpp are taken in the same run, each round after the slimlm modes.

    .venv/bin/python benchmarks/gguf_native.py --rounds 2 --tokens 128 --threads 2 --dtype bf16 --llama-bench /work/llama.cpp/build/bin/llama-bench

The machine this runs on may be shared: only ratios measured side by side mean anything there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def warm_up_imports() -> None:
    """Build a tiny model on the meta device once: torch imports ~60 MB of modules lazily on the first
    one, which is the interpreter's cost, not the model's."""
    import torch

    import slimlm.quant.linear  # noqa: F401  (registers the kinds)
    from slimlm.models.config import ModelConfig
    from slimlm.models.transformer import Transformer

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100}
    with torch.device("meta"):
        Transformer(ModelConfig.from_hf(cfg))


def worker(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    import gc

    import torch
    from quantization import decode_tok_s

    from slimlm import kernels
    from slimlm.loaders import describe, load_model
    from slimlm.loaders.resolve import alias_path
    from slimlm.utils.memory import release_free_memory

    torch.set_num_threads(args.threads)
    kernels.load()
    warm_up_imports()
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gc.collect()
    release_free_memory()
    base = rss_bytes()
    t = time.perf_counter()
    lm = load_model(args.model, dtype=dtype, dequantize=mode == "dequantize")
    load_s = time.perf_counter() - t
    gc.collect()
    release_free_memory()
    model_rss = rss_bytes() - base
    path = alias_path(args.model) if not Path(args.model).is_file() else Path(args.model)
    d = describe(lm)
    res: dict[str, Any] = {"mode": mode, "load_s": load_s, "model_rss_bytes": model_rss, "file_bytes": path.stat().st_size,
                           "size_in_memory_bytes": d["size_in_memory_bytes"], "tensor_bytes": d["tensor_bytes"]}
    res["rss_over_file"] = model_rss / res["file_bytes"]
    ids = torch.randint(100, 1000, (1, args.prefill))
    pre = []
    with torch.inference_mode():
        lm.model(ids[:, :32])  # warm-up
        for _ in range(args.rounds):
            t = time.perf_counter()
            lm.model(ids, last_only=True)
            pre.append(args.prefill / (time.perf_counter() - t))
    res["prefill_tok_s"] = pre
    res["decode_tok_s"] = [decode_tok_s(lm.model, 1, 16, args.tokens) for _ in range(args.rounds)]
    return res


def llama_bench(bench: str, gguf: Path, threads: int, prefill: int, tokens: int) -> tuple[float, float]:
    p = subprocess.run([bench, "-m", str(gguf), "-t", str(threads), "-p", str(prefill), "-n", str(tokens), "-r", "1",
                        "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(p.stdout)
    pp = next(float(r["avg_ts"]) for r in rows if r["n_prompt"] > 0)
    tg = next(float(r["avg_ts"]) for r in rows if r["n_gen"] > 0)
    return pp, tg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--modes", default="native,dequantize")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench binary (optional)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    results: dict[str, dict[str, Any]] = {}
    for _ in range(args.rounds):  # rounds interleaved: each mode in a fresh process, then llama.cpp
        for mode in args.modes.split(","):
            rest = sys.argv[1:]
            if "--rounds" in rest:  # the worker measures one round
                i = rest.index("--rounds")
                rest = rest[:i] + rest[i + 2:]
            cmd = [sys.executable, __file__, "--worker", mode, "--rounds", "1", *rest]
            p = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(p.stdout.strip().splitlines()[-1])
            acc = results.setdefault(mode, {**r, "prefill_tok_s": [], "decode_tok_s": []})
            acc["prefill_tok_s"] += r["prefill_tok_s"]
            acc["decode_tok_s"] += r["decode_tok_s"]
        if args.llama_bench:
            from slimlm.loaders.resolve import alias_path

            path = alias_path(args.model) if not Path(args.model).is_file() else Path(args.model)
            pp, tg = llama_bench(args.llama_bench, path, args.threads, args.prefill, args.tokens)
            acc = results.setdefault("llama.cpp", {"prefill_tok_s": [], "decode_tok_s": []})
            acc["prefill_tok_s"].append(pp)
            acc["decode_tok_s"].append(tg)
    print("| mode | model RSS MiB | x file | tensors x file | prefill tok/s | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for mode, r in results.items():
        rss = f"{r['model_rss_bytes'] / 2**20:.0f}" if "model_rss_bytes" in r else "-"
        over = f"{r['rss_over_file']:.3f}" if "rss_over_file" in r else "-"
        tens = f"{r['tensor_bytes'] / r['file_bytes']:.3f}" if "tensor_bytes" in r else "-"
        print(f"| {mode} | {rss} | {over} | {tens} | {statistics.median(r['prefill_tok_s']):.0f} | "
              f"{statistics.median(r['decode_tok_s']):.1f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
