"""How close ``slimlm plan``'s predictions come to measured runs of the embedded SmolLM2-135M
(issue 21 acceptance: peak RSS within 25%, decode tok/s within 30%).

Memory (each run in a fresh subprocess; its VmHWM is the whole process's peak, compared with the
planner's total, whose residue is measured the same way: a fresh interpreter after the imports):

- ``inference``: fp32 (GGUF de-quantized), a prompt of ``--context - 8`` tokens + 8 generated;
- ``quantize``: ``slimlm quantize --method gptq`` with ``--calib-samples`` x ``--calib-seq-len``
  tokens of Python's documentation (memory does not depend on which text);
- ``serve``: the offline engine (``LLM``, paged KV, continuous batching) runs ``--serve-streams``
  distinct prompts of ``--serve-prompt`` tokens at once, ``--serve-new`` tokens each, fp32 base;
- ``finetune``: ``slimlm finetune --method lora --r --lora-rank`` on the built-in instruct data,
  fp32 base, ``--lora-batch`` windows of ``--lora-seq-len`` tokens, ``--lora-steps`` AdamW steps;
  ``--heap-check`` runs it again with ``MALLOC_MMAP_THRESHOLD_=131072``, so that glibc hands freed
  activation memory back at once: the planner counts live bytes, and the default run's peak is
  higher by what the heap keeps of freed activations.

Decode tok/s at batch 1 for fp32, bf16, RTN int8 (per channel, symmetric) and RTN int4 (g128): each
variant generates ``--new-tokens`` after a ``--prompt-tokens`` prompt (ignoring EOS); the median of
``--repeats`` runs against the planner's prediction at the same context. Speed on a shared machine
is noisy: read the errors with the load average printed beside them. Memory is not load-sensitive.

Run (quiet machine, the acceptance settings; ~10 minutes)::

    .venv/bin/python benchmarks/plan_accuracy.py --out benchmarks/results/plan_accuracy.json

Smallest setting (proves the script end to end, ~2 minutes on a quiet 2-core machine)::

    .venv/bin/python benchmarks/plan_accuracy.py --small --out /tmp/plan_accuracy_small.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from slimlm.bench.sysinfo import save_json, system_info
from slimlm.plan.planner import PlanConfig, plan
from slimlm.plan.roofline import load_roofline, measure_residue
from slimlm.plan.shapes import read_shape

FORMATS = ("fp32", "bf16", "int8", "int4")
ROOT = Path(__file__).resolve().parents[1]
MiB = 2**20

# each prints the process's peak RSS (VmHWM) as its last stdout line
INFERENCE = """
import torch
from slimlm.loaders import load_model
from slimlm.engine.generate import generate
from slimlm.engine.sampling import SamplingConfig
from slimlm.utils.memory import peak_rss_bytes
lm = load_model("smollm2-135m", dtype=torch.float32, dequantize=True)
generate(lm.model, lm.tokenizer, [list(range(100, 100 + {prompt}))], SamplingConfig(max_new_tokens=8, ignore_eos=True))
print(peak_rss_bytes())
"""
SERVE = """
import torch
from slimlm.loaders import load_model
from slimlm.engine.llm import LLM
from slimlm.engine.sampling import SamplingConfig
from slimlm.engine.scheduler import SchedulerConfig
from slimlm.utils.memory import peak_rss_bytes
lm = load_model("smollm2-135m", dtype=torch.float32, dequantize=True)
llm = LLM(lm, SchedulerConfig(max_num_seqs={streams}))
prompts = [[100 + (7 * i + j) % 20000 for j in range({prompt})] for i in range({streams})]  # distinct: no prefix hits
out = llm.generate(prompts, SamplingConfig(max_new_tokens={new}, ignore_eos=True))
assert all(len(o.token_ids) == {new} for o in out)
print(peak_rss_bytes())
"""
COMMAND = """
from slimlm.cli.main import main
from slimlm.utils.memory import peak_rss_bytes
code = main({argv!r})
assert code == 0, code
print(peak_rss_bytes())
"""


def _peak(code: str, extra_env: dict[str, str] | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(extra_env or {})}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=3600, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"measurement failed (exit {r.returncode}):\n{r.stderr[-2000:]}")
    return int(r.stdout.strip().splitlines()[-1])


def memory_rows(args: argparse.Namespace, residue: int) -> list[dict[str, Any]]:
    shape = read_shape("smollm2-135m")
    roof = {"residue_bytes": residue}
    tmp = Path(tempfile.mkdtemp(prefix="plan-accuracy-"))
    cases = [
        (f"fp32 inference, context {args.context}", INFERENCE.format(prompt=args.context - 8),
         PlanConfig(formats=["fp32"], context=args.context)),
        (f"GPTQ calibration {args.calib_samples} x {args.calib_seq_len}", COMMAND.format(argv=[
            "quantize", "smollm2-135m", "--method", "gptq", "--calib", "builtin:pydoc", "--calib-samples",
            str(args.calib_samples), "--calib-seq-len", str(args.calib_seq_len), "--out", str(tmp / "q"),
            "--no-progress"]),
         PlanConfig(task="quantize", calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len)),
        (f"LoRA r {args.lora_rank} fine-tuning, {args.lora_batch} x {args.lora_seq_len}", COMMAND.format(argv=[
            "finetune", "smollm2-135m", "--dequantize", "--method", "lora", "--r", str(args.lora_rank),
            "--data", "builtin:instruct", "--seq-len", str(args.lora_seq_len), "--batch-size", str(args.lora_batch),
            "--max-steps", str(args.lora_steps), "--train-dtype", "fp32", "--out", str(tmp / "lora"),
            "--no-progress"]),
         PlanConfig(task="finetune", method="lora", lora_rank=args.lora_rank, seq_len=args.lora_seq_len,
                    batch=args.lora_batch, formats=["fp32"], optimizer="adamw")),
        (f"serving {args.serve_streams} streams, {args.serve_prompt} + {args.serve_new} tokens each",
         SERVE.format(streams=args.serve_streams, prompt=args.serve_prompt, new=args.serve_new),
         PlanConfig(task="serve", formats=["fp32"], context=args.serve_prompt + args.serve_new,
                    batch=args.serve_streams)),
    ]
    rows: list[dict[str, Any]] = []
    try:
        _measure(cases, args, shape, roof, rows, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # the outputs of the measured commands (this script made tmp)
    return rows


def _measure(cases: list[tuple[str, str, PlanConfig]], args: argparse.Namespace, shape: Any, roof: dict[str, Any],
             rows: list[dict[str, Any]], tmp: Path) -> None:
    print(f"{'peak RSS':<44} {'predicted':>10} {'measured':>10} {'error':>7}  (MiB; residue {roof['residue_bytes'] / MiB:.0f})")
    for name, code, cfg in cases:
        if args.only_case and args.only_case not in name:
            continue
        measured = _peak(code)
        v = plan(shape, cfg, roof)["variants"][0]
        pred = v["total_bytes"]
        err = pred / measured - 1
        rows.append({"case": name, "predicted_bytes": pred, "measured_bytes": measured, "error": err,
                     "terms": v["memory"]})
        print(f"{name:<44} {pred / MiB:>10.0f} {measured / MiB:>10.0f} {err:>+7.0%}", flush=True)
        if args.terms:
            for k, b in v["memory"].items():
                print(f"    {k:<40} {b / MiB:>10.1f}")
        if args.heap_check and cfg.task == "finetune":  # the same run with glibc returning freed memory
            again = code.replace("'--no-progress']", "'--no-progress', '--checkpoint-dir', '" + str(tmp / "ckpt-heap") +
                                 "', '--overwrite']")
            live = _peak(again, {"MALLOC_MMAP_THRESHOLD_": "131072"})
            rows[-1]["measured_bytes_mmap_threshold_128k"] = live
            rows[-1]["error_vs_mmap_threshold_128k"] = pred / live - 1
            print(f"{'  same, MALLOC_MMAP_THRESHOLD_=131072':<44} {pred / MiB:>10.0f} {live / MiB:>10.0f} "
                  f"{pred / live - 1:>+7.0%}", flush=True)


def measured_decode(fmt: str, prompt_tokens: int, new_tokens: int, repeats: int) -> float:
    from slimlm.engine.generate import generate
    from slimlm.engine.sampling import SamplingConfig
    from slimlm.loaders import load_model
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


def decode_rows(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
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
    return rows, roof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--what", choices=["all", "memory", "decode"], default="all")
    ap.add_argument("--small", action="store_true", help="smallest setting: proves the script, not the acceptance")
    ap.add_argument("--only-case", default=None, help="memory: run only the case whose name contains this text")
    ap.add_argument("--terms", action="store_true", help="memory: print the planner's terms under each case")
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--calib-seq-len", type=int, default=512)
    ap.add_argument("--heap-check", action="store_true",
                    help="finetune: measure again with MALLOC_MMAP_THRESHOLD_=131072 (glibc returns freed "
                         "activation memory at once): the planner's live bytes vs the heap's retention")
    ap.add_argument("--lora-rank", type=int, default=16)
    ap.add_argument("--lora-seq-len", type=int, default=512)
    ap.add_argument("--lora-batch", type=int, default=4)
    ap.add_argument("--lora-steps", type=int, default=2)
    ap.add_argument("--serve-streams", type=int, default=16)
    ap.add_argument("--serve-prompt", type=int, default=512)
    ap.add_argument("--serve-new", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/plan_accuracy.json")
    args = ap.parse_args()
    if args.small:
        args.context, args.calib_samples, args.calib_seq_len = 256, 4, 128
        args.lora_seq_len, args.lora_batch, args.lora_steps = 128, 2, 1
        args.new_tokens, args.repeats = 8, 1
        args.serve_streams, args.serve_prompt, args.serve_new = 4, 64, 8
    out: dict[str, Any] = {"benchmark": "plan_accuracy", "system": system_info(), "settings": vars(args),
                           "loadavg_start": os.getloadavg()[0]}
    if args.what in ("all", "memory"):
        residue = measure_residue()
        out["residue_bytes"] = residue
        out["memory"] = memory_rows(args, residue)
    if args.what in ("all", "decode"):
        out["decode"], out["roofline"] = decode_rows(args)
    out["loadavg_end"] = os.getloadavg()[0]
    save_json(out, args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
