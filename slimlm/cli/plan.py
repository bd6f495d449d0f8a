"""``slimlm plan MODEL --task ...``: memory, speed and compute of a task before anything runs (docs/plan.md)."""

from __future__ import annotations

import argparse
from typing import Any

from slimlm.cli.common import add_json_arg, add_model_arg, emit_json, float_arg, human_bytes, int_arg


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slimlm.plan.memory import OPTIMIZERS
    from slimlm.plan.planner import TASKS, PlanConfig

    p = sub.add_parser("plan", help="predict memory, speed and compute of a task from the config alone",
                       description="Predict a task's memory (weights by format, KV cache, activations, gradients, "
                                   "optimizer states, calibration) against available memory, decode/prefill "
                                   "tok/s from this CPU's measured roofline, and Chinchilla's compute-optimal "
                                   "N and D. Reads only the config / GGUF header; no weight is loaded.")
    add_model_arg(p)
    p.add_argument("--task", choices=TASKS, default="inference", help="what to plan (default inference)")
    p.add_argument("--formats", default="fp32,bf16,int8,int4",
                   help="comma-separated weight formats: native, fp32, bf16, int8, int4, int3, intB-gG, nf4, "
                        "GGUF types (Q4_K, Q8_0, ...); default fp32,bf16,int8,int4")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="dtype of what stays float (default fp32)")
    p.add_argument("--context", type=int_arg(min=1), default=2048, help="inference/serve tokens per sequence (default 2048)")
    p.add_argument("--batch", type=int_arg(min=1), default=1, help="sequences (serve: streams) at once (default 1)")
    p.add_argument("--kv-dtype", choices=["fp32", "bf16", "fp16", "fp8"], default="",
                   help="KV cache dtype (default: the model dtype, what slimlm's runtime uses)")
    p.add_argument("--block-size", type=int_arg(min=1), default=16, help="serve: tokens per KV block (default 16)")
    p.add_argument("--batched-tokens", type=int_arg(min=1), default=PlanConfig.batched_tokens,
                   help=f"serve: tokens per engine step (default {PlanConfig.batched_tokens}, the engine's)")
    p.add_argument("--kv-budget-gib", type=float_arg(gt=0), default=PlanConfig.kv_budget_gib,
                   help=f"serve: the engine's KV pool in GiB (default {PlanConfig.kv_budget_gib:g}, slimlm serve's)")
    p.add_argument("--seq-len", type=int_arg(min=1), default=512, help="finetune/pretrain tokens per sample (default 512)")
    p.add_argument("--checkpointing", action="store_true", help="finetune/pretrain: activation checkpointing per layer")
    p.add_argument("--method", choices=["lora", "full"], default="lora", help="finetune: lora (default) or full")
    p.add_argument("--lora-rank", type=int_arg(min=1), default=16, help="finetune: LoRA rank (default 16)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help="finetune/pretrain optimizer (default adamw)")
    p.add_argument("--galore-rank", type=int_arg(min=1), default=128, help="GaLore projection rank (default 128)")
    p.add_argument("--calib-samples", type=int_arg(min=1), default=128, help="quantize: calibration windows (default 128)")
    p.add_argument("--calib-seq-len", type=int_arg(min=2), default=512, help="quantize: tokens per window (default 512)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--flops", type=float_arg(gt=0), default=None, help="compute budget in FLOPs (Chinchilla optimum)")
    g.add_argument("--cpu-hours", type=float_arg(gt=0), default=None,
                   help="compute budget in hours of this machine at its measured training rate")
    p.add_argument("--tokens", type=float_arg(gt=0), default=None, help="training tokens D for the predicted loss")
    p.add_argument("--memory-gib", type=float_arg(gt=0), default=None, help="memory to plan for (default MemAvailable)")
    p.add_argument("--no-measure", action="store_true",
                   help="skip the CPU measurement (no speed; a stated default residue unless cached)")
    p.add_argument("--remeasure", action="store_true", help="measure this CPU again (refresh the cache)")
    add_json_arg(p)
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from slimlm.plan.planner import PlanConfig, plan, planned_context
    from slimlm.plan.roofline import cache_dir, cache_key, load_roofline
    from slimlm.plan.shapes import read_shape

    cfg = PlanConfig(task=args.task, formats=[f.strip() for f in args.formats.split(",") if f.strip()],
                     dtype=args.dtype, context=args.context, batch=args.batch, kv_dtype=args.kv_dtype,
                     block_size=args.block_size, batched_tokens=args.batched_tokens, kv_budget_gib=args.kv_budget_gib,
                     seq_len=args.seq_len,
                     checkpointing=args.checkpointing, method=args.method, lora_rank=args.lora_rank,
                     optimizer=args.optimizer, galore_rank=args.galore_rank, calib_samples=args.calib_samples,
                     calib_seq_len=args.calib_seq_len, flops=args.flops, cpu_hours=args.cpu_hours,
                     tokens=args.tokens,
                     memory_bytes=int(args.memory_gib * 2**30) if args.memory_gib else None)
    if not cfg.formats:
        cfg.formats = ["fp32"]
    cfg.check()  # bad names fail before the model or the CPU is touched
    shape = read_shape(args.model)
    planned_context(shape, cfg)  # and a context beyond the model, before minutes of CPU measurement
    roof = None
    if not args.no_measure:
        roof = load_roofline(remeasure=args.remeasure, progress=not args.json)
    else:
        import json

        path = cache_dir() / "roofline.json"
        try:
            cached = json.loads(path.read_text()) if path.is_file() else None
            roof = cached if isinstance(cached, dict) and cached.get("key") == cache_key() else None
        except (OSError, ValueError):
            roof = None
    result = plan(shape, cfg, roof)
    if args.json:
        emit_json(result)
    else:
        print_plan(result)
    return 0


def print_plan(r: dict[str, Any]) -> None:
    print(f"{r['model']}: {r['architecture']}, {r['parameters'] / 1e6:.1f} M parameters "
          f"({r['non_embedding_parameters'] / 1e6:.1f} M non-embedding), {r['layers']} layers, "
          f"{r['kv_heads']} KV heads x {r['head_dim']}")
    extra = f", {r['method']} with {r['optimizer']}" if "optimizer" in r else ""
    print(f"task {r['task']}: batch {r['batch']}, {r['context']} tokens{extra}; available memory "
          f"{human_bytes(r['available_bytes'])}; process residue {human_bytes(r['residue_bytes'])} "
          f"({'measured' if r['residue_measured'] else 'not measured: a stated default'})")
    variants = r["variants"]
    names = list(dict.fromkeys(k for v in variants for k in v["memory"]))
    width = max(len(n) for n in [*names, "largest batch / context"]) + 2
    print("\nmemory".ljust(width + 1) + "".join(f"{v['format']:>12}" for v in variants))
    for n in names:
        print(n.ljust(width) + "".join(f"{human_bytes(v['memory'].get(n, 0)):>12}" for v in variants))
    print("total".ljust(width) + "".join(f"{human_bytes(v['total_bytes']):>12}" for v in variants))
    print("fits".ljust(width) + "".join(f"{'yes' if v['fits'] else 'NO':>12}" for v in variants))
    if "streams_in_pool" in variants[0]:
        print("kv the streams need".ljust(width) + "".join(f"{human_bytes(v['kv_needed_bytes']):>12}" for v in variants))
        print("streams the pool holds".ljust(width) + "".join(f"{v['streams_in_pool']:>12}" for v in variants))
    if "max_batch" in variants[0]:
        print("largest batch / context".ljust(width)
              + "".join(f"{str(v['max_batch']) + ' / ' + str(v['max_context']):>12}" for v in variants))
    if "speed" in variants[0]:
        m = r["machine"]
        print(f"\nspeed (roofline: {m['bandwidth_gbs']:.1f} GB/s read, {m['gemm_gflops']['fp32']:.0f} fp32 / "
              f"{m['gemm_gflops']['bf16']:.0f} bf16 GFLOP/s, {m['threads']} threads; cache {m['cache_file']})")
        keys = [k for k in variants[0]["speed"] if k.startswith(("decode_tok_s", "prefill_tok_s"))]
        for k in keys:
            print(k.replace("_", " ").ljust(width) + "".join(f"{v['speed'][k]:>12.1f}" for v in variants))
        print("decode efficiency".ljust(width) + "".join(f"{v['speed']['decode_efficiency']:>12.2f}" for v in variants))
        print("prefill efficiency".ljust(width) + "".join(f"{v['speed']['prefill_efficiency']:>12.2f}" for v in variants))
    c = r.get("compute")
    if c:
        print("\ncompute (Chinchilla fit L = 1.69 + 406.4/N^0.34 + 410.7/D^0.28, C = 6ND)")
        if "cpu_hours" in c:
            print(f"  {c['cpu_hours']:g} CPU-hours at {c['training_flops_per_s'] / 1e9:.1f} GFLOP/s measured")
        if "budget_flops" in c:
            print(f"  budget {c['budget_flops']:.3g} FLOPs -> optimal N {c['optimal_parameters']:.3g} parameters, "
                  f"D {c['optimal_tokens']:.3g} tokens ({c['tokens_per_parameter']:.1f} tokens/parameter), "
                  f"loss {c['optimal_loss']:.3f}")
        if "model_loss" in c:
            print(f"  this model (N {c['model_parameters']:.3g} non-embedding) on D {c['model_tokens']:.3g} tokens: "
                  f"predicted loss {c['model_loss']:.3f} ({c['model_flops']:.3g} FLOPs)")
