"""``slimlm info | eval | generate | export``: the foundation commands."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from slimlm.cli.common import (
    add_json_arg,
    add_model_arg,
    add_runtime_args,
    emit_json,
    human_bytes,
    int_arg,
    kv_policy_arg,
    load,
    status,
)
from slimlm.utils.errors import SlimlmError


# --- info ---------------------------------------------------------------------------------------
def run_info(args: argparse.Namespace) -> int:
    from slimlm.loaders import describe

    lm = load(args)
    d = describe(lm)
    if args.json:
        emit_json(d)
        return 0
    for k, v in d.items():
        if k.endswith("_bytes"):
            v = human_bytes(v)
        elif k == "parameters":
            v = f"{v:,} ({v / 1e6:.1f} M)"
        print(f"{k:>22}: {v}")
    return 0


# --- eval ---------------------------------------------------------------------------------------
def run_eval(args: argparse.Namespace) -> int:
    from slimlm.calib.data import read_text
    from slimlm.eval.perplexity import evaluate_perplexity, evaluate_stream

    if args.kv_policy is not None and args.kv_policy.evicts and args.data and len(args.data) > 1:
        raise SlimlmError("a streaming --kv-policy scores one stream: give one --data file")
    lm = load(args)
    if lm.tokenizer is None:
        raise SlimlmError(f"{args.model} has no tokenizer; perplexity needs one")
    files = args.data or [None]
    results = []
    for f in files:
        text = read_text(f, args.start_char)
        ids = lm.tokenizer.encode(text)
        bos = lm.tokenizer.bos_token_id if args.bos else None
        if args.bos and bos is None:
            raise SlimlmError("--bos given but the tokenizer has no BOS token")
        policy = args.kv_policy
        if policy is not None and policy.evicts:  # one stream through the StreamingLLM / H2O cache
            sr = evaluate_stream(lm.model, ids, policy, score_last=args.score_last, chunk=args.stream_chunk,
                                 max_tokens=args.max_tokens, progress=not args.no_progress)
            out1: dict[str, Any] = {"file": f or "pydoc_data.topics", "kv_policy": str(policy), **sr.to_dict()}
            if args.json:
                emit_json(out1)
            else:
                print(f"{out1['file']}: perplexity {sr.perplexity:.4f} over the last {sr.tokens_scored} of "
                      f"{sr.tokens_streamed} streamed tokens ({policy}, KV {sr.kv_bytes} bytes held) "
                      f"in {sr.seconds:.1f}s")
            continue
        r = evaluate_perplexity(lm.model, ids, seq_len=args.seq_len, stride=args.stride, bos_id=bos,
                                max_tokens=args.max_tokens, progress=not args.no_progress, kv_policy=policy)
        results.append((f or "pydoc_data.topics", r))
        if not args.json:
            print(f"{f or 'pydoc_data.topics'}: perplexity {r.perplexity:.4f} over {r.tokens_scored} tokens "
                  f"({r.windows} windows of {r.seq_len}) in {r.seconds:.1f}s, {r.tokens_per_s:.0f} tok/s")
    if not results:  # streaming: printed per file above
        return 0
    nll = sum(r.nll * r.tokens_scored for _, r in results)
    n = sum(r.tokens_scored for _, r in results)
    secs = sum(r.seconds for _, r in results)
    out: dict[str, Any] = {"perplexity": math.exp(nll / n), "tokens_scored": n, "seconds": secs,
                           "tokens_per_s": sum(r.tokens_scored for _, r in results) / secs if secs else 0.0,
                           "seq_len": args.seq_len, "dtype": args.dtype, "model": args.model,
                           "files": [{"file": f, **r.to_dict()} for f, r in results]}
    if args.json:
        emit_json(out)
    elif len(results) > 1:
        print(f"all files: perplexity {out['perplexity']:.4f} over {n} tokens")
    return 0


# --- generate -----------------------------------------------------------------------------------
def run_generate(args: argparse.Namespace) -> int:
    from slimlm.engine.generate import generate
    from slimlm.engine.sampling import SamplingConfig

    cfg = SamplingConfig.from_args(args)
    lm = load(args)
    tok = lm.tokenizer
    if tok is None:
        raise SlimlmError(f"{args.model} has no tokenizer; generate needs one")
    prompts = args.prompt or []
    if not prompts:
        raise SlimlmError("give at least one --prompt")
    ids = []
    for p in prompts:
        if args.chat:
            msgs = ([{"role": "system", "content": args.system}] if args.system else []) + [{"role": "user", "content": p}]
            text = tok.apply_chat_template(msgs, add_generation_prompt=True)
            ids.append(tok.encode(text))
        else:
            ids.append(tok.encode(p, add_bos=bool(tok.add_bos_token)))
    stream = not args.json and len(ids) == 1
    res = generate(lm.model, tok, ids, cfg, on_text=(lambda s: print(s, end="", flush=True)) if stream else None,
                   kv_policy=args.kv_policy)
    if args.json:
        emit_json({
            "text": res.texts[0] if len(res.texts) == 1 else res.texts,
            "new_tokens": res.new_tokens,
            "prompt_tokens": res.prompt_tokens,
            "finish_reason": res.finish_reasons[0] if len(res.texts) == 1 else res.finish_reasons,
            "decode_tokens_per_s": res.decode_tokens_per_s,
            "prefill_tokens_per_s": res.prefill_tokens_per_s,
            "prefill_seconds": res.prefill_seconds, "decode_seconds": res.decode_seconds,
            "dtype": args.dtype, "model": args.model,
        })
        return 0
    if stream:
        print()
    else:
        for i, t in enumerate(res.texts):
            print(f"--- [{i}] {t}")
    status(f"[{res.new_tokens} new tokens | prefill {res.prefill_tokens_per_s:.0f} tok/s | "
           f"decode {res.decode_tokens_per_s:.1f} tok/s | {args.dtype}]")
    return 0


# --- export -------------------------------------------------------------------------------------
def _export_hf(lm: Any, out: str, args: argparse.Namespace) -> None:
    from slimlm.loaders.save import export_hf

    export_hf(lm, out, overwrite=args.overwrite)


def _export_gguf(lm: Any, out: str, args: argparse.Namespace) -> None:
    """Quantized linears go in as their exact GGUF blocks (Q8_0/Q4_0/Q4_1) when their grid fits; the
    others are re-quantized: to Q8_0/Q4_0 by their bits for a plain 32-block type, or by the K-quant
    type / mix's rule when one is asked for (a GPTQ/AWQ grid never fits a K-quant's 6-bit sub-block scales)."""
    from slimlm.loaders.gguf_mix import BLOCK, MIXES
    from slimlm.loaders.gguf_writer import export_gguf
    from slimlm.models.modules import SwappableLinear
    from slimlm.quant.export import gguf_raw_from_model

    raw, exact = gguf_raw_from_model(lm.model)
    inexact = [k for k, ok in exact.items() if not ok]
    k_target = args.gguf_type in MIXES or BLOCK.get(args.gguf_type) == 256
    if k_target:
        raw = {k: v for k, v in raw.items() if exact[k]}
        kept = sorted({v[1].name for v in raw.values()})
        if raw:
            status(f"note: {len(raw)} quantized tensors keep their exact GGUF blocks ({'/'.join(kept)}) "
                   f"instead of {args.gguf_type}'s type")
    if inexact:
        target = args.gguf_type if k_target else "Q8_0/Q4_0"
        status(f"note: {len(inexact)} quantized tensors have no exact GGUF type (their grid does not fit) and were "
               f"re-quantized to {target} from their de-quantized weights")
    dense = sorted({str(m.kind) for m in lm.model.modules() if isinstance(m, SwappableLinear)
                    and getattr(type(m), "to_quantized", None) is None})
    if dense:
        status(f"note: GGUF has no {'/'.join(dense)} type: those linears were expanded and encoded as {args.gguf_type}")
    export_gguf(lm, out, default_type=args.gguf_type, overwrite=args.overwrite, embed_type=args.embed_type,
                raw=raw or None)


def _export_compressed_tensors(lm: Any, out: str, args: argparse.Namespace) -> None:
    from slimlm.quant.export import export_compressed_tensors, split_model

    parts = split_model(lm.model, target="compressed-tensors")
    if not parts.quantized:
        raise SlimlmError(f"{args.model} has no quantized linears to export as compressed-tensors (quantize it first)")
    export_compressed_tensors(parts, out, overwrite=args.overwrite, tokenizer=lm.tokenizer)


def _export_gptq(lm: Any, out: str, args: argparse.Namespace) -> None:
    from slimlm.quant.export import export_gptq, split_model

    parts = split_model(lm.model, target="GPTQ")
    if not parts.quantized:
        raise SlimlmError(f"{args.model} has no quantized linears to export in the GPTQ layout (quantize it first)")
    export_gptq(parts, out, checkpoint_format=args.gptq_format, overwrite=args.overwrite, tokenizer=lm.tokenizer)


# Export targets: name -> function(loaded model, out path, args).
EXPORTERS: dict[str, Any] = {"hf": _export_hf, "gguf": _export_gguf,
                             "compressed-tensors": _export_compressed_tensors, "gptq": _export_gptq}


def run_export(args: argparse.Namespace) -> int:
    from slimlm.loaders.gguf_writer import written_by_slimlm
    from slimlm.loaders.outputs import check_output_dir, check_output_file

    if args.to not in EXPORTERS:
        raise SlimlmError(f"unknown export target {args.to!r}; choose from {', '.join(sorted(EXPORTERS))}")
    if args.to == "gguf":
        check_output_file(args.out, args.overwrite, written_by_slimlm)
    else:
        check_output_dir(args.out, args.overwrite)
    lm = load(args, dense=True)
    t = time.perf_counter()
    EXPORTERS[args.to](lm, args.out, args)
    status(f"exported {args.model} to {args.to} at {args.out} in {time.perf_counter() - t:.1f}s")
    if args.json:
        emit_json({"out": args.out, "to": args.to})
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slimlm.engine.sampling import SamplingConfig

    p = sub.add_parser("info", help="architecture, parameters, dtype, size on disk and in memory")
    add_model_arg(p)
    add_runtime_args(p)
    add_json_arg(p)
    p.set_defaults(func=run_info)

    from slimlm.eval.perplexity import PROTOCOL

    p = sub.add_parser("eval", help="perplexity over text files (GPTQ-paper protocol by default)",
                       description="Perplexity of MODEL over text files.\n\n" + PROTOCOL,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    p.add_argument("--data", nargs="+", default=None, help="text file(s); default: Python's pydoc topics text")
    p.add_argument("--seq-len", type=int_arg(min=2), default=2048, help="window length in tokens (default 2048)")
    p.add_argument("--stride", type=int_arg(min=1), default=None,
                   help="overlapping windows: after the first, each window scores only its last STRIDE tokens")
    p.add_argument("--bos", action="store_true",
                   help="prepend BOS to every window and score the first text token too (see above)")
    p.add_argument("--max-tokens", type=int_arg(min=1), default=None, help="score only the first N tokens of each file")
    p.add_argument("--start-char", type=int_arg(min=0), default=0, help="skip this many characters of each file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--kv-policy", type=kv_policy_arg, default=None,
                   help="KV cache policy: full, window, int8, int4[:GROUP], streaming:SINKS:WINDOW or h2o:HEAVY:RECENT")
    p.add_argument("--stream-chunk", type=int_arg(min=1), default=1,
                   help="streaming policy: tokens fed per forward (default 1: exact StreamingLLM)")
    p.add_argument("--score-last", type=int_arg(min=1), default=4000,
                   help="streaming policy: score the last N predictions of the stream (default 4000)")
    add_runtime_args(p)
    add_json_arg(p)
    p.set_defaults(func=run_eval)

    p = sub.add_parser("generate", help="generate text (streams to the terminal)")
    add_model_arg(p)
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--chat", action="store_true", help="apply the model's chat template to each prompt")
    p.add_argument("--system", default=None, help="system message (with --chat)")
    SamplingConfig.add_arguments(p)
    p.add_argument("--kv-policy", type=kv_policy_arg, default=None,
                   help="KV cache policy: full (default), window, int8, int4[:GROUP], streaming:SINKS:WINDOW, h2o:HEAVY:RECENT")
    add_runtime_args(p)
    add_json_arg(p)
    p.set_defaults(func=run_generate)

    p = sub.add_parser("export", help="export to hf (safetensors), gguf (llama.cpp), compressed-tensors or gptq")
    add_model_arg(p)
    p.add_argument("--to", required=True, help=f"target format ({', '.join(sorted(EXPORTERS))})")
    p.add_argument("out", help="output path")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output slimlm wrote (anything else is never replaced)")
    from slimlm.loaders.gguf_mix import PLAIN_TYPES, WRITE_TYPES

    p.add_argument("--gguf-type", "--type", default="Q8_0", choices=WRITE_TYPES, metavar="TYPE",
                   help="gguf: type of 2-D weights, or llama.cpp's Q4_K_M / Q5_K_M mix (default Q8_0; choices: "
                        + ", ".join(WRITE_TYPES) + ")")
    p.add_argument("--embed-type", default=None, choices=PLAIN_TYPES, metavar="TYPE",
                   help="gguf: type of the token embeddings / output (default: as --gguf-type)")
    p.add_argument("--gptq-format", default="gptq", choices=["gptq", "gptq_v2"],
                   help="gptq: zero-point convention (v1 stores zero-1)")
    add_runtime_args(p)
    add_json_arg(p)
    p.set_defaults(func=run_export)

