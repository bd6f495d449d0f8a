"""Batch-1 greedy decode speed: slimlm vs transformers `generate`, same model, dtype, prompt, length.

Both run the same dense weights (transformers loads slimlm's HF export of the model), the same
chat prompt, and generate the same number of tokens (EOS ignored). Runs are interleaved and the
median is reported: end-to-end tok/s (prefill included, as the issue measures `generate`) and
decode-only tok/s (slimlm times its decode steps; transformers' prefill + first token is timed in
a separate 1-token `generate` and subtracted), the ratios, and the achieved GB/s of the decode
steps (weight bytes read per token x tok/s) against the read bandwidth measured in the same run.

    .venv/bin/python benchmarks/decode.py                      # fp32 and bf16, 128 tokens
    .venv/bin/python benchmarks/decode.py --dtypes fp32 --new-tokens 64 --repeats 3
"""

from __future__ import annotations

import argparse
import functools
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimlm.bench.sysinfo import has_native_bf16, measure_bandwidth, save_json, system_info  # noqa: E402
from slimlm.bench.timing import interleave, stopwatch, summarize, time_generation  # noqa: E402
from slimlm.loaders import load_model  # noqa: E402
from slimlm.loaders.save import export_hf  # noqa: E402

DT = {"fp32": torch.float32, "bf16": torch.bfloat16}


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every linear (lm_head included) + norms; one embedding row."""
    total = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) or hasattr(m, "dense_weight"):
            sd = m.state_dict()
            total += sum(t.numel() * t.element_size() for t in sd.values())
        elif name.endswith("norm"):
            total += sum(p.numel() * p.element_size() for p in m.parameters())
    return total


def run_slimlm(lm, prompt: list[int], n: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """End-to-end and decode-only tok/s of one generation (the protocol's timing function)."""
    r = time_generation(lm.model, lm.tokenizer, [prompt], n)
    return {"e2e": r["e2e_tok_s"], "decode": r["decode_tok_s"]}


def run_hf(model, prompt: list[int], n: int) -> float:  # type: ignore[no-untyped-def]
    ids = torch.tensor([prompt])

    def gen():  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0)

    out, total = stopwatch(gen)
    assert out.shape[1] - ids.shape[1] == n
    return n / total


def run_hf_rounds(model, prompt: list[int], n: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """tok/s of an ``n``-token generate and seconds of a 1-token one (its prefill + first token)."""
    return {"e2e": run_hf(model, prompt, n), "first": 1 / run_hf(model, prompt, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--out", default="bench-results/decode.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    info = system_info()
    bw = measure_bandwidth()
    print(f"CPU: {info['cpu_model']} ({info['cpu_capability']}, flags {info['cpu_flags']}), "
          f"{args.threads} threads, read bandwidth {bw:.1f} GB/s, load {info['loadavg_1m']:.2f}")
    results = []
    for dname in args.dtypes.split(","):
        dt = DT[dname]
        lm = load_model(args.model, dtype=dt, dequantize=True)
        msgs = [{"role": "user", "content": "Write a short story about a robot who learns to paint."}]
        prompt = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
        hf = None
        if not args.no_hf:
            # transformers runs the same dense weights: slimlm's HF export of the model (transformers
            # 5.x would otherwise keep a GGUF's weights packed and de-quantize them per matmul)
            hf_dir = Path(tempfile.mkdtemp(prefix="slimlm-bench-hf-"))
            export_hf(lm, hf_dir / "m", dtype=torch.float32)
            hf = AutoModelForCausalLM.from_pretrained(str(hf_dir / "m"), dtype=dt, attn_implementation="eager")
            hf.eval()
            shutil.rmtree(hf_dir, ignore_errors=True)
        measures = {"slimlm": functools.partial(run_slimlm, lm, prompt, args.new_tokens)}
        if hf is not None:
            # the prefill + first token is timed in a separate 1-token generate (subtracted below)
            measures["hf"] = functools.partial(run_hf_rounds, hf, prompt, args.new_tokens)
        runs = interleave(measures, args.repeats, warmup=1)  # slimlm, hf, slimlm, hf, ...
        ours, ours_dec = runs["slimlm"]["e2e"], runs["slimlm"]["decode"]
        theirs, theirs_first = runs.get("hf", {}).get("e2e", []), runs.get("hf", {}).get("first", [])
        s, sd = summarize(ours)["median"], summarize(ours_dec)["median"]
        bpt = weight_bytes_per_token(lm.model)
        row = {"dtype": dname, "new_tokens": args.new_tokens, "prompt_tokens": len(prompt),
               "slimlm_tok_s": s, "slimlm_runs": ours, "slimlm_decode_tok_s": sd, "weight_bytes_per_token": bpt,
               "slimlm_GBps": sd * bpt / 1e9, "roofline_tok_s": bw * 1e9 / bpt,
               "fraction_of_roofline": sd * bpt / (bw * 1e9)}
        if theirs:
            h = summarize(theirs)["median"]
            # transformers' decode-only rate: the same run minus its own prefill (+ first token) time
            hd = (args.new_tokens - 1) / (args.new_tokens / h - summarize(theirs_first)["median"])
            row.update(hf_tok_s=h, hf_runs=theirs, ratio=s / h, hf_decode_tok_s=hd, decode_ratio=sd / hd)
        results.append(row)
        print(f"{dname}: slimlm {s:.1f} tok/s end-to-end, {sd:.1f} decode-only ({row['slimlm_GBps']:.1f} GB/s, "
              f"{100 * row['fraction_of_roofline']:.0f}% of the {row['roofline_tok_s']:.0f} tok/s roofline)" +
              (f" | transformers {h:.1f} / {hd:.1f} | ratio {row['ratio']:.2f}x end-to-end, "
               f"{row['decode_ratio']:.2f}x decode-only" if theirs else ""))
        if dname == "bf16" and not has_native_bf16():
            print("  note: this CPU has no native bf16 (avx512_bf16/amx): bf16 matmuls are emulated")
        del lm, hf
    out = {"benchmark": "decode", "model": args.model, "system": info, "bandwidth_GBps": bw, "results": results,
           "command": " ".join(sys.argv)}
    print(f"saved {save_json(out, args.out)}")


if __name__ == "__main__":
    main()
