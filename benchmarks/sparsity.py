"""Pruning / factorization / GQA benchmark on SmolLM2-135M: perplexity, size, speed (JSON + markdown).

Protocol (shared/REFERENCE.md): WikiText-2 test, first 40,960 tokens, windows of 1024, no BOS
(dense fp32 24.14); calibration 128 x 512-token windows (seed 0) of wiki.test.raw from character
400,000 on. Each case starts from the dense fp32 model (the shipped GGUF de-quantized), is
compressed in memory, saved with ``save_model`` (size on disk = model.safetensors), reloaded from
disk and measured: perplexity, stored parameters, nonzero parameters, prefill tok/s (one 256-token
prompt) and greedy decode tok/s (64 tokens), all fp32 on this CPU.

Run (the machine is shared and slow: run subsets, e.g. ``--only dense,sparsegpt-50``)::

    .venv/bin/python benchmarks/sparsity.py --out-json bench-sparsity.json --out-md bench-sparsity.md
    .venv/bin/python benchmarks/sparsity.py --only kernels            # dense vs CSR crossover
    .venv/bin/python benchmarks/sparsity.py --only dense,wanda-50 --eval-tokens 20480 --calib-samples 32

Cases: dense, {magnitude,wanda,sparsegpt}-{50,2:4,4:8}, sparsegpt-50-w4, structured-75, svd-80,
asvd-80, gqa-1 (SmolLM2 has 9 query / 3 KV heads: halving is impossible, 1 = MQA), kernels.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")


def _cases() -> dict[str, Callable[[Any, list[torch.Tensor]], dict[str, Any]]]:
    from slimlm.lowrank import FactorizeConfig, GQAConfig, convert_gqa_, factorize_
    from slimlm.sparsity import PruneConfig, prune_
    from slimlm.sparsity.structured import StructuredPruneConfig, structured_prune_

    def pr(**kw: Any) -> Callable[[Any, list[torch.Tensor]], dict[str, Any]]:
        return lambda lm, s: prune_(lm.model, PruneConfig(**kw), s, progress=False)

    out: dict[str, Callable[[Any, list[torch.Tensor]], dict[str, Any]]] = {"dense": lambda lm, s: {}}
    for m in ("magnitude", "wanda", "sparsegpt"):
        out[f"{m}-50"] = pr(method=m, sparsity=0.5)
        out[f"{m}-2:4"] = pr(method=m, pattern="2:4")
        out[f"{m}-4:8"] = pr(method=m, pattern="4:8")
    out["sparsegpt-50-w4"] = pr(method="sparsegpt", sparsity=0.5, bits=4, group_size=128)
    out["structured-75"] = lambda lm, s: structured_prune_(lm.model, StructuredPruneConfig(target_ratio=0.75), s,
                                                           progress=False)
    out["svd-80"] = lambda lm, s: factorize_(lm.model, FactorizeConfig(ratio=0.8), s, progress=False)
    out["asvd-80"] = lambda lm, s: factorize_(lm.model, FactorizeConfig(ratio=0.8, activation_aware=True), s,
                                              progress=False)
    out["gqa-1"] = lambda lm, s: convert_gqa_(lm.model, GQAConfig(kv_heads=1), s, progress=False)
    out["gqa-1-weighted"] = lambda lm, s: convert_gqa_(lm.model, GQAConfig(kv_heads=1, weighting="activation"), s,
                                                       progress=False)
    return out


@torch.no_grad()
def speed(model: Any, prompt_len: int, decode: int, repeats: int = 2) -> dict[str, float]:
    """Prefill tok/s for one prompt and greedy decode tok/s through the KV cache (best of repeats)."""
    from slimlm.engine.generate import generate
    from slimlm.engine.sampling import SamplingConfig

    ids = [int(i) for i in torch.randint(100, 10000, (prompt_len,), generator=torch.Generator().manual_seed(0))]
    best: dict[str, float] = {"prefill_tok_s": 0.0, "decode_tok_s": 0.0}
    for _ in range(repeats):
        r = generate(model, None, [ids], SamplingConfig(max_new_tokens=decode, ignore_eos=True))
        best["prefill_tok_s"] = max(best["prefill_tok_s"], r.prefill_tokens_per_s)
        best["decode_tok_s"] = max(best["decode_tok_s"], r.decode_tokens_per_s)
    return best


def nonzero_params(model: Any) -> int:
    from slimlm.models.modules import SwappableLinear

    n = 0
    seen: set[int] = set()
    for m in model.modules():
        if isinstance(m, SwappableLinear):
            if getattr(m, "kind", "") == "lowrank":  # the factors are what is stored and multiplied
                n += sum(int((t != 0).sum()) for t in list(m.parameters()) + list(m.buffers()))
            else:  # sparse/quantized: nonzeros of the effective weight
                n += int((m.dense_weight() != 0).sum()) + (m.bias.numel() if m.has_bias else 0)  # type: ignore[union-attr]
            for t in m.parameters():
                seen.add(id(t))
            for t in m.buffers():
                seen.add(id(t))
    for t in list(model.parameters()):
        if id(t) not in seen:
            seen.add(id(t))
            n += int((t != 0).sum())
    return n


def kernels(sparsities: list[float], repeats: int = 30) -> list[dict[str, Any]]:
    """Dense F.linear vs torch CSR matmul on SmolLM2's MLP shapes, batch 1 (decode) and 128 (prefill)."""
    import torch.nn.functional as F

    from slimlm.bench.timing import time_call

    rows = []
    for out_f, in_f in ((1536, 576), (576, 1536)):
        for s in sparsities:
            w = torch.randn(out_f, in_f)
            w[torch.rand(out_f, in_f) < s] = 0
            csr = w.to_sparse_csr()
            for t in (1, 128):
                x = torch.randn(t, in_f)

                def run(f: Callable[[], Any]) -> float:  # median ms: the protocol's timing function
                    return time_call(f, repeats, warmup=3) * 1e3

                d = run(lambda: F.linear(x, w))  # noqa: B023
                c = run(lambda: torch.sparse.mm(csr, x.t()).t())  # noqa: B023
                rows.append({"shape": f"{out_f}x{in_f}", "sparsity": s, "tokens": t, "dense_ms": d, "csr_ms": c,
                             "csr_speedup": d / c})
                print(f"  {out_f}x{in_f} s={s:.2f} T={t}: dense {d:.3f} ms, csr {c:.3f} ms", file=sys.stderr)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated cases (default: all); see the docstring")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--calib-start-char", type=int, default=400_000)
    ap.add_argument("--eval-tokens", type=int, default=40_960)
    ap.add_argument("--eval-seq-len", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--no-speed", action="store_true", help="skip the prefill/decode timing")
    ap.add_argument("--paired-speed", type=int, default=0,
                    help="after all cases, time the kept models in turn N rounds (best of N; fairer on a busy machine)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out-json", default=None)
    ap.add_argument("--out-md", default=None)
    args = ap.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    if args.threads:
        torch.set_num_threads(args.threads)
    from slimlm.calib.data import calibration_samples, read_text
    from slimlm.eval.perplexity import evaluate_perplexity
    from slimlm.loaders import load_model
    from slimlm.loaders.save import save_model

    cases = _cases()
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [*cases, "kernels"]
    unknown = [n for n in names if n not in cases and n != "kernels"]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; known: {', '.join([*cases, 'kernels'])}")
    from slimlm.bench.sysinfo import cpu_model

    info = {"cpu": cpu_model(), "capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "args": vars(args)}
    results: dict[str, Any] = {"machine": info, "cases": {}}
    if "kernels" in names:
        results["kernels"] = kernels([0.5, 0.75, 0.9, 0.95, 0.98])
        names = [n for n in names if n != "kernels"]
    if names:
        if not Path(args.data).is_file():
            print(f"skipping model cases: {args.data} not found", file=sys.stderr)
            names = []
    if names:
        base = load_model(args.model, dequantize=True)
        text = read_text(args.data)
        eval_ids = base.tokenizer.encode(text)[: args.eval_tokens]
        calib = calibration_samples(base.tokenizer, text[args.calib_start_char:], args.calib_samples,
                                    args.calib_seq_len, seed=0)
    kept: dict[str, Any] = {}
    for name in names:
        print(f"== {name}", file=sys.stderr, flush=True)
        lm = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = cases[name](lm, calib)
        secs = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            out = save_model(lm, Path(tmp) / "m")
            disk = (out / "model.safetensors").stat().st_size
            del lm
            lm2 = load_model(str(out))
        ppl = evaluate_perplexity(lm2.model, eval_ids, seq_len=args.eval_seq_len, progress=False)
        row = {"perplexity": ppl.perplexity, "parameters": lm2.model.num_parameters(),
               "nonzero_parameters": nonzero_params(lm2.model), "size_on_disk_bytes": disk,
               "compress_seconds": secs, "eval_seconds": ppl.seconds,
               **({"prefill_tok_s": float("nan"), "decode_tok_s": float("nan")} if args.no_speed or args.paired_speed
                  else speed(lm2.model, args.prompt_len, args.decode_tokens)),
               "report": {k: v for k, v in report.items() if k not in ("modules", "block_influence")}}
        results["cases"][name] = row
        if args.paired_speed:
            kept[name] = lm2.model
        print(json.dumps({name: {k: v for k, v in row.items() if k != "report"}}), file=sys.stderr, flush=True)
        if args.out_json:  # keep partial results of long runs
            Path(args.out_json).write_text(json.dumps(results, indent=2, default=str))
    if kept:
        for _ in range(args.paired_speed):  # interleave so load changes hit every model alike
            for name, model in kept.items():
                sp = speed(model, args.prompt_len, args.decode_tokens, repeats=1)
                row = results["cases"][name]
                for k, v in sp.items():
                    row[k] = v if row[k] != row[k] else max(row[k], v)  # NaN -> first value
        print(json.dumps({n: {k: results["cases"][n][k] for k in ("prefill_tok_s", "decode_tok_s")} for n in kept}),
              file=sys.stderr)
    md = markdown(results)
    print(md)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(results, indent=2, default=str))
    if args.out_md:
        Path(args.out_md).write_text(md)
    return 0


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [f"CPU: {m['cpu']} ({m['capability']}), {m['threads']} threads, torch {m['torch']}", ""]
    if results["cases"]:
        lines += ["| case | ppl | params (M) | nonzero (M) | disk (MB) | prefill tok/s | decode tok/s |",
                  "|---|---|---|---|---|---|---|"]
        for n, r in results["cases"].items():
            lines.append(f"| {n} | {r['perplexity']:.2f} | {r['parameters'] / 1e6:.1f} | "
                         f"{r['nonzero_parameters'] / 1e6:.1f} | {r['size_on_disk_bytes'] / 2**20:.1f} | "
                         f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
    if results.get("kernels"):
        lines += ["", "| shape | sparsity | tokens | dense ms | CSR ms | CSR speedup |", "|---|---|---|---|---|---|"]
        for k in results["kernels"]:
            lines.append(f"| {k['shape']} | {k['sparsity']:.2f} | {k['tokens']} | {k['dense_ms']:.3f} | "
                         f"{k['csr_ms']:.3f} | {k['csr_speedup']:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
