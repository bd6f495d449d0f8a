"""Quantization benchmark on SmolLM2-135M: ppl, bits/weight, size, peak RSS, time, decode tok/s.

Protocol (issue 3 / ``../shared/REFERENCE.md``): WikiText-2 test (``wiki.test.raw``), first 40,960
tokens, windows of 1024, no BOS; calibration ``--n-samples`` x ``--seq-len`` tokens (128 x 512) drawn
with the reference sampling (seed 0) from ``wiki.test.raw`` from character 400,000 on (disjoint from
the scored text). ``--reference-protocol`` uses 64 x 512 (the table of REFERENCE.md: non-sequential,
asymmetric, damp 0.01, block 128; its numbers: RTN w4g128 32.20, GPTQ w4g128 31.95 / act-order
29.24, RTN w3g128 120.29, GPTQ w3g128 75.91 / act-order 51.97).

Caveat: the shipped weights were stored as Q4_1 (RTN 4-bit, group 32, asymmetric), so that
setting reproduces them exactly; g128 and 3-bit are used to show method differences.

Each variant runs in its own subprocess (so peak RSS is per variant): quantize, save with
``save_model`` (size on disk), perplexity of the quantized model, then reload the saved folder in
bf16 and measure greedy decode tok/s at batch 1 and 16. Results: ``--out`` JSON + a markdown table.

Run (full, slow on 2 shared cores; one variant takes minutes)::

    .venv/bin/python benchmarks/quantization.py --threads 2
    .venv/bin/python benchmarks/quantization.py --only rtn-w4g128,gptq-w4g128 --reference-protocol
    .venv/bin/python benchmarks/quantization.py --only rtn-w4g128 --eval-tokens 4096 --no-decode  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WIKI = ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"

# name -> (load dtype, config dict or None for the unquantized model)
_G128 = {"group_size": 128}
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "rtn-w8": ("fp32", {"kind": "rtn", "bits": 8, "group_size": -1, "symmetric": True}),
    "rtn-w4g128": ("fp32", {"kind": "rtn", "bits": 4, **_G128}),
    # the tied lm_head (113 MB in fp32, read on every decode step) also quantized, to int8 per channel
    "rtn-w8-head8": ("fp32", {"kind": "rtn", "bits": 8, "group_size": -1, "symmetric": True, "ignore": []}),
    "rtn-w4g128-head8": ("fp32", {"kind": "rtn", "bits": 4, **_G128, "ignore": [], "overrides": {
        "lm_head": {"bits": 8, "group_size": -1, "symmetric": True}}}),
    "gptq-w4g128": ("fp32", {"kind": "gptq", "bits": 4, "act_order": True, **_G128}),
    "gptq-w4g128-noact": ("fp32", {"kind": "gptq", "bits": 4, "act_order": False, **_G128}),
    # the calibration forwards in fp32 (the default "auto" runs them in bf16 on CPUs with native bf16)
    "gptq-w4g128-fp32calib": ("fp32", {"kind": "gptq", "bits": 4, "act_order": True, **_G128, "calib_dtype": "fp32"}),
    "rtn-w3g128": ("fp32", {"kind": "rtn", "bits": 3, **_G128}),
    "gptq-w3g128": ("fp32", {"kind": "gptq", "bits": 3, "act_order": True, **_G128}),
    "gptq-w3g128-noact": ("fp32", {"kind": "gptq", "bits": 3, "act_order": False, **_G128}),
    "awq-w4g128": ("fp32", {"kind": "awq", "bits": 4, **_G128}),
    "smoothquant-w8a8": ("fp32", {"kind": "smoothquant", "alpha": 0.5}),
    "int8-outlier": ("fp32", {"kind": "int8-outlier", "threshold": 6.0}),
    "nf4": ("fp32", {"kind": "nf4"}),
}
REFERENCE = {"rtn-w4g128": 32.20, "gptq-w4g128-noact": 31.95, "gptq-w4g128": 29.24, "gptq-w4g128-fp32calib": 29.24, "rtn-w3g128": 120.29,
             "gptq-w3g128-noact": 75.91, "gptq-w3g128": 51.97, "fp32": 24.14}


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def decode_tok_s(model: Any, batch: int, prompt_len: int, new_tokens: int) -> float:
    """Greedy decode throughput (batch tokens / s over the decode steps) through the KV cache, timed by
    the protocol's :func:`slimlm.bench.timing.time_generation` after a 3-token warm-up generation."""
    from slimlm.bench.timing import time_generation

    torch.manual_seed(0)
    prompts = torch.randint(0, min(1000, model.config.vocab_size), (batch, prompt_len)).tolist()
    time_generation(model, None, prompts, 3)  # warm-up
    return time_generation(model, None, prompts, new_tokens)["decode_tok_s"]


def decode_dtype(name: str) -> torch.dtype:
    """Decode runs in bf16 (quantized models: bf16 activations, norms and embedding; the kernels'
    preferred input) except for the fp32 baseline."""
    return torch.float32 if name == "fp32" else torch.bfloat16


def worker(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from slimlm.calib.data import WIKITEXT_CALIB_OFFSET, calibration_samples, read_text
    from slimlm.eval.perplexity import evaluate_perplexity
    from slimlm.loaders import load_model
    from slimlm.loaders.save import save_model
    from slimlm.quant import needs_calibration, quantize_
    from slimlm.utils.config import BaseConfig
    from slimlm.utils.memory import peak_rss_bytes, release_free_memory, reset_peak_rss

    dtype_name, cfg_dict = VARIANTS[name]
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    lm = load_model(args.model, dtype=dtype, dequantize=True)
    text = read_text(WIKI)
    eval_ids = lm.tokenizer.encode(text)[: args.eval_tokens]
    res: dict[str, Any] = {"name": name, "config": cfg_dict}
    rss_loaded = peak_rss_bytes()  # nothing reset it yet: the process peak so far (the load)
    res["fp32_model_bytes"] = lm.model.num_parameters() * 4
    if cfg_dict is not None:
        cfg_dict = {**cfg_dict, **({"true_sequential": True} if args.true_sequential and cfg_dict["kind"] == "gptq" else {})}
        if args.reference_protocol and cfg_dict["kind"] == "gptq":  # REFERENCE.md's runs were fp32 throughout
            cfg_dict = {"calib_dtype": "fp32", **cfg_dict}
        cfg = BaseConfig.load_any(cfg_dict)
        samples = None
        if needs_calibration(cfg):  # type: ignore[arg-type]
            calib = read_text(WIKI, WIKITEXT_CALIB_OFFSET)
            samples = calibration_samples(lm.tokenizer, calib, args.n_samples, args.seq_len, seed=0)
        lm.checkpoint.tensors = {}  # the loader's interchange copy is not needed any more
        release_free_memory()
        res["rss_before_quant_bytes"] = current_rss()
        reset_peak_rss()
        t0 = time.perf_counter()
        rep = quantize_(lm.model, cfg, samples, progress=not args.no_progress)  # type: ignore[arg-type]
        res["quant_seconds"] = time.perf_counter() - t0
        res["peak_rss_quant_bytes"] = peak_rss_bytes()  # process peak during quantization (model included)
        res["bits_per_weight_quantized"] = rep.quantized_bits_per_weight
        res["bits_per_weight_linears"] = rep.linear_bits_per_weight
        res["bits_per_weight_model"] = rep.model_bits_per_weight
        res["module_kinds"] = {k: int(v["modules"]) for k, v in rep.by_kind().items()}
    res["peak_rss_load_bytes"] = rss_loaded
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        out = save_model(lm, Path(tmp) / "model", meta={"benchmark": name})
        res["size_on_disk_bytes"] = (out / "model.safetensors").stat().st_size
        r = evaluate_perplexity(lm.model, eval_ids, seq_len=args.eval_seq_len, progress=not args.no_progress)
        res["ppl"] = r.perplexity
        res["eval_tokens"] = r.tokens_scored
        res["eval_seconds"] = r.seconds
        if not args.no_decode:
            del lm
            dec = load_model(str(out), dtype=decode_dtype(name))
            for b in args.batch_sizes:
                res[f"decode_tok_s_b{b}"] = decode_tok_s(dec.model, b, 16, args.decode_tokens)
            res["decode_dtype"] = str(dec.model.dtype).replace("torch.", "")
    if name in REFERENCE:
        res["reference_ppl"] = REFERENCE[name]
    return res


def paired_decode(names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Batch-1 decode of several variants in one process, in interleaved rounds (order rotated each
    round), so a noisy machine (other tenants, frequency changes) hits every variant alike.

    Calibrated variants are skipped (their module kinds are the same as RTN's). Returns per-variant
    rates and, when bf16 is among them, the median over rounds of each variant's ratio to bf16.
    """
    from slimlm.loaders import load_model
    from slimlm.loaders.save import save_model
    from slimlm.quant import needs_calibration, quantize_
    from slimlm.utils.config import BaseConfig

    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for name in names:
            dtype_name, cfg_dict = VARIANTS[name]
            dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
            cfg = BaseConfig.load_any(cfg_dict) if cfg_dict is not None else None
            if cfg is not None and needs_calibration(cfg):  # type: ignore[arg-type]
                continue
            lm = load_model(args.model, dtype=dtype, dequantize=True)
            if cfg is not None:
                quantize_(lm.model, cfg)  # type: ignore[arg-type]
            out = save_model(lm, Path(tmp) / name)
            del lm
            models[name] = load_model(str(out), dtype=decode_dtype(name)).model  # as the worker measures it: reloaded
    rates: dict[str, list[float]] = {n: [] for n in models}
    order = list(models)
    for r in range(args.paired_decode):
        for name in order[r % len(order):] + order[: r % len(order)]:
            rates[name].append(decode_tok_s(models[name], 1, 16, args.decode_tokens))
    res: dict[str, Any] = {"rounds": args.paired_decode, "tok_s_b1": rates,
                           "median_tok_s_b1": {n: statistics.median(v) for n, v in rates.items()}}
    if "bf16" in rates:
        res["median_ratio_to_bf16"] = {n: statistics.median(a / b for a, b in zip(v, rates["bf16"], strict=True))
                                       for n, v in rates.items()}
    return res


def table(results: list[dict[str, Any]]) -> str:
    head = ("| variant | ppl | ref ppl | bits/w (quantized linears) | bits/w (model) | disk MB | peak RSS quant MB | "
            "quant s | tok/s b1 | tok/s b16 |")
    rows = [head, "|" + "---|" * 10]
    for r in results:
        def f(k: str, fmt: str = "{:.2f}", scale: float = 1.0, r: dict[str, Any] = r) -> str:
            v = r.get(k)
            return fmt.format(v / scale) if isinstance(v, (int, float)) else "-"
        rows.append(f"| {r['name']} | {f('ppl')} | {f('reference_ppl')} | {f('bits_per_weight_quantized', '{:.3f}')} | "
                    f"{f('bits_per_weight_model', '{:.3f}')} | {f('size_on_disk_bytes', '{:.1f}', 2**20)} | "
                    f"{f('peak_rss_quant_bytes', '{:.0f}', 2**20)} | {f('quant_seconds', '{:.1f}')} | "
                    f"{f('decode_tok_s_b1', '{:.1f}')} | {f('decode_tok_s_b16', '{:.1f}')} |")
    return "\n".join(rows)


def main() -> int:
    from slimlm.bench.sysinfo import cpu_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", help="comma-separated variants: " + ",".join(VARIANTS))
    ap.add_argument("--reference-protocol", action="store_true", help="64 x 512 calibration (REFERENCE.md table)")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--true-sequential", action="store_true", help="GPTQ true-sequential inside a layer")
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--no-decode", action="store_true")
    ap.add_argument("--paired-decode", type=int, default=0, metavar="ROUNDS",
                    help="afterwards, batch-1 decode of the non-calibrated variants in one process, ROUNDS interleaved rounds")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--tmp", default=None, help="folder for the temporary saved models")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quantization.json"))
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    if args.reference_protocol:
        args.n_samples = 64
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "paired":
        print("RESULT " + json.dumps(paired_decode(args.only.split(","), args)), flush=True)
        return 0
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, args)), flush=True)
        return 0
    if not WIKI.is_file():
        print(f"missing {WIKI}", file=sys.stderr)
        return 2
    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        print(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}", file=sys.stderr)
        return 2
    passthrough: list[str] = []
    skip = False
    for a in sys.argv[1:]:  # everything but --only goes to the workers
        if skip or a.startswith("--only="):
            skip = False
            continue
        if a == "--only":
            skip = True
            continue
        passthrough.append(a)
    results = []
    for n in names:
        print(f"== {n}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--worker", n], stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not line:
            print(f"variant {n} failed (exit {proc.returncode})", file=sys.stderr)
            continue
        r = json.loads(line[-1][7:])
        results.append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "config"}), flush=True)
    paired: dict[str, Any] | None = None
    if args.paired_decode:
        print("== paired decode", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, *passthrough, "--only", ",".join(names), "--worker", "paired"],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        paired = json.loads(line[-1][7:]) if proc.returncode == 0 and line else None
        if paired is None:
            print(f"paired decode failed (exit {proc.returncode})", file=sys.stderr)
    meta = {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "n_samples": args.n_samples,
            "seq_len": args.seq_len, "eval_tokens": args.eval_tokens, "eval_seq_len": args.eval_seq_len,
            "command": " ".join(sys.argv)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(out.read_text()) if out.is_file() else {"runs": []}
    old["runs"].append({"meta": meta, "results": results, "paired_decode": paired})
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(old, indent=2))
    tmp.replace(out)
    md = f"<!-- {meta['command']} -->\n" + table(results) + "\n"
    if paired:
        ratio = paired.get("median_ratio_to_bf16", {})
        md += (f"\nPaired batch-1 decode ({paired['rounds']} interleaved rounds, median tok/s; x bf16 = median of "
               "per-round ratios):\n\n| variant | tok/s b1 | x bf16 |\n|---|---|---|\n")
        md += "".join(f"| {n} | {v:.1f} | {ratio.get(n, float('nan')):.2f} |\n" for n, v in paired["median_tok_s_b1"].items())
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
