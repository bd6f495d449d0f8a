"""``slimlm demo``: the main job on the embedded default model (SmolLM2-135M-Instruct GGUF).

Loads the model, prints info, measures perplexity on a slice of Python's documentation text,
generates a chat answer (streamed) and reports decode tok/s. Later features append steps here.
"""

from __future__ import annotations

import argparse
import time

import torch

from slimlm.cli.common import DTYPES, add_runtime_args, apply_threads, human_bytes, int_arg, status


def run_demo(args: argparse.Namespace) -> int:
    from slimlm.calib.data import default_text
    from slimlm.engine.generate import generate
    from slimlm.engine.sampling import SamplingConfig
    from slimlm.eval.perplexity import evaluate_perplexity
    from slimlm.loaders import describe, load_model

    apply_threads(args)
    print(f"== slimlm demo on {args.model} (CPU: {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads, {args.dtype})")
    t = time.perf_counter()
    lm = load_model(args.model, dtype=DTYPES[args.dtype])
    d = describe(lm)
    print(f"loaded in {time.perf_counter() - t:.1f}s: {d['architecture']} ({d['family']}), "
          f"{d['parameters'] / 1e6:.1f} M parameters, {d['layers']} layers, {d['attention_heads']} heads / "
          f"{d['kv_heads']} KV heads, vocab {d['vocab_size']}, {human_bytes(d['size_on_disk_bytes'])} on disk, "
          f"{human_bytes(d['size_in_memory_bytes'])} in memory ({d['dtype']})")

    ids = lm.tokenizer.encode(default_text())
    r = evaluate_perplexity(lm.model, ids, seq_len=512, max_tokens=512 * args.eval_windows)
    print(f"perplexity on Python's documentation ({r.tokens_scored} tokens, {r.windows} windows of 512): "
          f"{r.perplexity:.2f}  [{r.tokens_per_s:.0f} tok/s]")

    question = args.question
    print(f"\nuser> {question}\nassistant> ", end="", flush=True)
    msgs = [{"role": "user", "content": question}]
    prompt = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
    res = generate(lm.model, lm.tokenizer, [prompt], SamplingConfig(max_new_tokens=args.max_new_tokens),
                   on_text=lambda s: print(s, end="", flush=True))
    print()
    print(f"[{res.new_tokens} tokens | prefill {res.prefill_tokens_per_s:.0f} tok/s | "
          f"decode {res.decode_tokens_per_s:.1f} tok/s | finish: {res.finish_reasons[0]}]")
    if not args.skip_quantize:
        print()
        _quantize_step(lm, args, r.perplexity, res.decode_tokens_per_s, ids)
    status("demo done")
    return 0


def _quantize_step(lm, args, ppl_before: float, tok_s_before: float, ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    """Quantize in place (RTN int4, group 64: no calibration needed) and measure again."""
    from slimlm.engine.generate import generate
    from slimlm.engine.sampling import SamplingConfig
    from slimlm.eval.perplexity import evaluate_perplexity
    from slimlm.loaders import describe
    from slimlm.quant import RTNConfig, quantize_

    mem_before = describe(lm)["size_in_memory_bytes"]
    print("== quantization: RTN int4, group 64, decoder linears (embeddings and lm_head kept)")
    print("   (the embedded GGUF already stores 4-bit weights on a group-32 grid, so this shows the")
    print("    pipeline and the speed/memory effect; see BENCHMARKS.md for method comparisons)")
    rep = quantize_(lm.model, RTNConfig(bits=4, group_size=64), progress=True)
    mem_after = describe(lm)["size_in_memory_bytes"]
    r = evaluate_perplexity(lm.model, ids, seq_len=512, max_tokens=512 * args.eval_windows, progress=False)
    prompt = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(
        [{"role": "user", "content": args.question}], add_generation_prompt=True))
    res = generate(lm.model, lm.tokenizer, [prompt], SamplingConfig(max_new_tokens=args.max_new_tokens))
    print(f"quantized in {rep.seconds:.1f}s: {rep.quantized_bits_per_weight:.2f} bits/weight on the quantized "
          f"linears; model in memory {human_bytes(mem_before)} -> {human_bytes(mem_after)}")
    print(f"perplexity {ppl_before:.2f} -> {r.perplexity:.2f}; decode {tok_s_before:.1f} -> "
          f"{res.decode_tokens_per_s:.1f} tok/s")
    print(f"assistant (int4)> {res.texts[0].strip()}")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="run the main job on the embedded SmolLM2-135M model")
    p.add_argument("--model", default="smollm2-135m", help="model to demo (default: the embedded smollm2-135m)")
    p.add_argument("--question", default="What is the capital of France? Answer in one sentence.",
                   help="chat prompt")
    p.add_argument("--max-new-tokens", type=int_arg(min=1), default=64, help="tokens to generate (default 64)")
    p.add_argument("--eval-windows", type=int_arg(min=1), default=4, help="perplexity windows of 512 tokens (default 4)")
    p.add_argument("--skip-quantize", action="store_true", help="skip the quantization step")
    add_runtime_args(p)
    p.set_defaults(func=run_demo)
