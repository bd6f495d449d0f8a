"""How close ``slimlm plan``'s predictions come to measured runs of the embedded SmolLM2-135M.

Decode tok/s at batch 1 for fp32, bf16, RTN int8 (per channel, symmetric) and RTN int4 (g128): each
variant is loaded (dequantized from the GGUF, then quantized as the planner's format describes),
generates ``--new-tokens`` after a ``--prompt-tokens`` prompt (ignoring EOS), and its median of
``--repeats`` runs is compared with the planner's prediction at the same context. Prints predicted,
measured and the error, and saves JSON. Speed on a shared machine is noisy: read the errors with the
load average printed beside them.

Run: ``.venv/bin/python benchmarks/plan_accuracy.py [--out benchmarks/results/plan_accuracy.json]``
"""

from __future__ import annotations

import argparse
import os
import statistics

import torch

from slimlm.bench.sysinfo import save_json, system_info
from slimlm.engine.generate import generate
from slimlm.engine.sampling import SamplingConfig
from slimlm.loaders import load_model
from slimlm.plan.planner import PlanConfig, plan
from slimlm.plan.roofline import load_roofline
from slimlm.plan.shapes import read_shape

FORMATS = ("fp32", "bf16", "int8", "int4")


def measured_decode(fmt: str, prompt_tokens: int, new_tokens: int, repeats: int) -> float:
    from slimlm.quant.api import quantize_
    from slimlm.quant.methods.rtn import RTNConfig

    lm = load_model("smollm2-135m", dtype=torch.bfloat16 if fmt == "bf16" else torch.float32, dequantize=True)
    if fmt == "int8":
        quantize_(lm.model, RTNConfig(bits=8, group_size=-1, symmetric=True))
    elif fmt == "int4":
        quantize_(lm.model, RTNConfig(bits=4, group_size=128))
    ids = [list(range(100, 100 + prompt_tokens))]
    cfg = SamplingConfig(max_new_tokens=new_tokens, ignore_eos=True)
    generate(lm.model, lm.tokenizer, ids, SamplingConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    return statistics.median(generate(lm.model, lm.tokenizer, ids, cfg).decode_tokens_per_s for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/plan_accuracy.json")
    args = ap.parse_args()
    roof = load_roofline()
    shape = read_shape("smollm2-135m")
    ctx = args.prompt_tokens + args.new_tokens
    predicted = plan(shape, PlanConfig(formats=list(FORMATS), context=ctx), roof)
    rows = []
    print(f"{'format':>6} {'predicted':>10} {'measured':>10} {'error':>7}   (decode tok/s, batch 1, context {ctx}; "
          f"load {os.getloadavg()[0]:.1f})")
    for v in predicted["variants"]:
        pred = v["speed"]["decode_tok_s"]
        meas = measured_decode(v["format"], args.prompt_tokens, args.new_tokens, args.repeats)
        err = pred / meas - 1
        rows.append({"format": v["format"], "predicted_tok_s": pred, "measured_tok_s": meas, "error": err})
        print(f"{v['format']:>6} {pred:>10.1f} {meas:>10.1f} {err:>+7.0%}", flush=True)
    save_json({"benchmark": "plan_accuracy", "system": system_info(), "roofline": roof, "rows": rows,
               "loadavg_end": os.getloadavg()[0]}, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
