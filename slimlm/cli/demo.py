"""``slimlm demo``: the whole trade-off on the embedded SmolLM2-135M, in about 10 minutes on 2 cores.

1. Makes the variants, each with the slimlm command a user would type (printed): fp32 and bf16 of the
   base, the GGUF as shipped, GPTQ w4 g128 (``slimlm quantize``), Wanda 2:4 (``slimlm prune``) and a
   few LoRA steps on the built-in instruct data (``slimlm finetune``). Calibration text is the second
   half of Python's documentation (shipped with Python), so the demo needs no data download.
2. Measures them with one ``slimlm bench`` run (``slimlm.bench.protocol``: own process per variant,
   interleaved rounds, medians) at small sizes, which it states.
3. Writes ``report.html`` / ``report.md`` (``slimlm report``), prints the table, the verdicts and the
   report's path, picks the best variant by a stated rule and answers a chat prompt with it.

Everything goes to ``--out`` (default ``./slimlm-demo``); a re-run reuses the variants and the bench
run whose cache keys match (:mod:`slimlm.cli.demo_steps`) unless ``--fresh``. Example::

    slimlm demo                       # the README's first command runs this
    slimlm demo --fresh --ppl-tokens 4096 --variants fp32,gptq
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from slimlm.cli.common import int_arg, status
from slimlm.cli.demo_steps import (
    DemoConfig,
    Step,
    bench_key,
    best_variant,
    calib_text_file,
    is_cached,
    open_folder,
    plan_variants,
    save_state,
)
from slimlm.utils.errors import SlimlmError


def run_demo(args: argparse.Namespace) -> int:
    from slimlm.loaders.resolve import resolve

    t0 = time.perf_counter()
    cfg = DemoConfig.from_args(args)
    kind = resolve(args.model)[1]  # a missing model fails here, before the folder is made
    folder = Path(args.out)
    state = open_folder(folder)
    if args.threads:
        torch.set_num_threads(args.threads)
    calib, calib_what = calib_text_file(folder)
    steps = plan_variants(cfg, args.model, folder, kind, calib)
    print(f"== slimlm demo on {args.model}: {', '.join(s.label for s in steps)}; outputs in {folder}/")
    print(f"   CPU {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads. Sizes chosen to finish "
          f"in ~10 minutes on 2 cores: perplexity on the first {cfg.ppl_tokens} tokens of Python's documentation "
          f"(windows of {cfg.seq_len}; published protocols score 20480+ tokens of WikiText-2), timed rounds of "
          f"{cfg.prompt_tokens} prompt + {cfg.new_tokens} new tokens x {cfg.repeats} (after {cfg.warmup} warm-up), "
          f"calibration {cfg.calib_samples} x {cfg.calib_seq_len} tokens of {calib_what}, LoRA {cfg.lora_steps} "
          "steps. Numbers at these sizes are indicative; see `slimlm demo --help` to change them.", flush=True)
    made = _make_variants(steps, state, folder, args)
    run = _bench(made, cfg, state, folder, args)
    report = folder / "report.html"
    from slimlm.report import write_report

    write_report([str(folder / "results.json")], str(report))
    write_report([str(folder / "results.json")], str(folder / "report.md"))
    print()
    for line in table_lines(run):
        print(line)
    print(f"\nreport: {report.resolve()}  (Markdown: {(folder / 'report.md').resolve()})")
    label, why = best_variant(run, cfg.max_ppl_increase)
    print(f"best: {label}: {why}")
    spec = next(s.spec for s in made if s.label == label)
    _chat(spec, args.question, cfg.chat_tokens, label)
    status(f"demo done in {time.perf_counter() - t0:.0f}s")
    return 0


def _make_variants(steps: list[Step], state: dict[str, Any], folder: Path, args: argparse.Namespace) -> list[Step]:
    """Run each variant's command (or reuse its cached output); a step that fails is left out, the rest go on."""
    made = []
    for i, s in enumerate(steps, 1):
        head = f"[{i}/{len(steps)}] {s.label}: {s.what}"
        if s.argv is None:
            print(f"{head} (nothing to make)", flush=True)
            made.append(s)
            continue
        assert s.out is not None
        if not args.fresh and is_cached(state, s):
            print(f"{head}: reused {s.out} (cached; --fresh makes it again)", flush=True)
            made.append(s)
            continue
        argv = s.argv + ["--out", str(s.out), "--overwrite"] + (["--threads", str(args.threads)] if args.threads else [])
        print(f"{head}:\n    slimlm {' '.join(shlex.quote(a) for a in argv)}", flush=True)
        t = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(dir=folder, prefix=".ckpt-") as ckpt:  # the trainer's checkpoints
                _run_command(argv + (["--checkpoint-dir", ckpt] if argv[0] == "finetune" else []), args.debug)
        except Exception as e:  # one variant's failure; the demo goes on without it
            if args.debug:
                raise
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"    {s.label}: failed ({msg}); the demo goes on without it", file=sys.stderr, flush=True)
            state["variants"].pop(s.name, None)
            save_state(folder, state)
            continue
        state["variants"][s.name] = {"key": s.key, "out": str(s.out), "seconds": round(time.perf_counter() - t, 1)}
        save_state(folder, state)
        print(f"    made in {time.perf_counter() - t:.0f}s", flush=True)
        made.append(s)
    return made


def _run_command(argv: list[str], debug: bool) -> None:
    """One slimlm command, parsed by slimlm's own parser and run in this process."""
    from slimlm.cli.main import build_parser

    try:
        ns = build_parser().parse_args(argv)
    except SystemExit:
        raise SlimlmError(f"slimlm {argv[0]} refused its command line") from None
    ns.debug = debug
    code = ns.func(ns)
    if code:
        raise SlimlmError(f"slimlm {argv[0]} exited {code}")


def _bench(made: list[Step], cfg: DemoConfig, state: dict[str, Any], folder: Path,
           args: argparse.Namespace) -> dict[str, Any]:
    """One ``slimlm bench`` run of the variants (or the cached one); ``folder/results.json`` holds it."""
    from slimlm.bench.protocol import BenchConfig, run_bench
    from slimlm.bench.results import check_results, empty_results, read_results, write_json

    results = folder / "results.json"
    key = bench_key(made, cfg, args.threads)
    cached = state.get("bench") or {}
    if not args.fresh and cached.get("key") == key and results.is_file():
        runs = [r for r in read_results(results)["runs"] if r["run_id"] == cached.get("run_id")]
        if runs:
            print(f"bench: reused run {runs[0]['run_id']} of {runs[0]['started']} from {results} (cached; --fresh "
                  "measures again)", flush=True)
            return runs[0]
    sizes = ["--seq-len", str(cfg.seq_len), "--max-tokens", str(cfg.ppl_tokens), "--prompt-tokens",
             str(cfg.prompt_tokens), "--new-tokens", str(cfg.new_tokens), "--concurrency", str(cfg.concurrency),
             "--repeats", str(cfg.repeats), "--warmup", str(cfg.warmup)]
    if args.threads:
        sizes += ["--threads", str(args.threads)]
    command = "slimlm bench " + " ".join(shlex.quote(s.spec) for s in made) + " " + " ".join(sizes) + \
        f" --out {shlex.quote(str(results))}"
    print(f"bench ({len(made)} variants, each in its own process, rounds interleaved); the same measurement by "
          f"hand:\n    {command}", flush=True)
    bc = BenchConfig(variants=[s.spec for s in made], prompt_tokens=cfg.prompt_tokens, new_tokens=cfg.new_tokens,
                     concurrency=cfg.concurrency, repeats=cfg.repeats, warmup=cfg.warmup, seq_len=cfg.seq_len,
                     max_tokens=cfg.ppl_tokens, threads=args.threads, base="fp32")
    if results.exists() and not cached:
        read_results(results)  # a results file the demo did not record is replaced only if slimlm wrote it
    run = run_bench(bc, command=command)
    obj = empty_results()
    obj["runs"].append(run)  # the file holds this run only: the report shows one consistent set
    check_results(obj, str(results))
    write_json(obj, results)
    state["bench"] = {"key": key, "run_id": run["run_id"]}
    save_state(folder, state)
    return run


def table_lines(run: dict[str, Any]) -> list[str]:
    """The demo's table (one row per variant, from the bench run's numbers) and the report's verdicts."""
    from slimlm.report.data import MB, fmt, points, verdict

    corpus = run["corpora"][0]["name"]
    conc = run["settings"]["concurrency"]
    head = ["variant", "perplexity", "vs base", "bits/w", "weights MB", "peak RSS MB", "prefill tok/s",
            "decode tok/s", f"decode x{conc}"]
    rows = []
    for p in points([run]):
        if not p.ok:
            rows.append([p.label, "failed"] + ["-"] * (len(head) - 2))
            continue
        v, bp = p.variant, (p.base or {}).get("perplexity", {}).get(corpus)
        ppl = p.ppl(corpus)
        rows.append([p.label, fmt(ppl, 2), f"{100 * (ppl / bp['perplexity'] - 1):+.1f}%" if ppl and bp else "-",
                     f"{v['bits_per_weight']:.2f}", f"{v['weight_bytes'] / MB:.1f}",
                     f"{v['memory']['peak_rss_bytes'] / MB:.0f}", fmt(p.speed("prefill_tok_s"), 0), fmt(p.speed()),
                     fmt(p.speed("decode_tok_s_concurrent")) if conc > 1 else "-"])
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:  # first column left-aligned, the numbers right-aligned
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out = [f"perplexity on {corpus}, machine {run['machine']['cpu_model']} ({run['machine']['threads']} threads):",
           line(head), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    out += ["", "verdicts:"] + ["  " + verdict(p) for p in points([run])]
    return out


def _chat(spec: str, question: str, max_new_tokens: int, label: str) -> None:
    """Answer ``question`` with the variant ``spec`` (loaded as the bench loaded it), streamed."""
    from slimlm.bench.protocol import Variant
    from slimlm.cli.common import DTYPES
    from slimlm.engine.generate import generate
    from slimlm.engine.sampling import SamplingConfig
    from slimlm.loaders import load_model

    v = Variant.parse(spec)
    lm = load_model(v.model, dtype=DTYPES[v.dtype], dequantize=v.dequantize)
    if v.adapter:
        from slimlm.peft.adapter import load_adapter

        load_adapter(lm.model, v.adapter)
    if lm.tokenizer is None:
        print(f"({label} has no tokenizer: no chat)")
        return
    try:
        text = lm.tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)
    except SlimlmError:  # no chat template: the plain question
        text = question
    prompt = lm.tokenizer.encode(text)
    print(f"\nuser> {question}\nassistant ({label})> ", end="", flush=True)
    generate(lm.model, lm.tokenizer, [prompt], SamplingConfig(max_new_tokens=max_new_tokens),
             on_text=lambda s: print(s, end="", flush=True))
    print()


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("demo", help="make fp32/bf16/quantized/pruned/LoRA variants of SmolLM2-135M, bench them, "
                       "write the report and chat with the best (about 10 minutes on 2 cores)",
                       description=(__doc__ or "").split("Example::")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="model to demo (default: the embedded smollm2-135m)")
    p.add_argument("--out", default="slimlm-demo", help="demo folder: variants, results.json, report.html "
                   "(default ./slimlm-demo; a folder slimlm demo did not make is refused)")
    p.add_argument("--fresh", action="store_true", help="make and measure everything again (default: reuse the cache)")
    p.add_argument("--question", default="What is the capital of France? Answer in one sentence.",
                   help="chat prompt for the best variant")
    p.add_argument("--threads", type=int_arg(min=1), default=None, help="torch threads (default: all cores)")
    DemoConfig.add_arguments(p.add_argument_group("sizes and variants"))
    p.set_defaults(func=run_demo)
