"""``slimlm bench`` (measure variants with one protocol) and ``slimlm report`` (HTML / Markdown).

    slimlm bench smollm2-135m bf16=smollm2-135m,dtype=bf16 --out results.json
    slimlm report results.json --out report.html

See docs/bench.md for the protocol and the results schema.
"""

from __future__ import annotations

import argparse
import shlex

from slimlm.cli.common import add_json_arg, emit_json, int_arg, status


def run_bench_cmd(args: argparse.Namespace) -> int:
    from slimlm.bench.protocol import BenchConfig, run_bench
    from slimlm.bench.results import append_run, check_writable
    from slimlm.report.data import compare_lines

    previous = check_writable(args.out)  # before any work: a file we may not append to fails now
    cfg = BenchConfig(variants=args.models, data=args.data or [], prompt_tokens=args.prompt_tokens,
                      new_tokens=args.new_tokens, concurrency=args.concurrency, repeats=args.repeats,
                      warmup=args.warmup, seq_len=args.seq_len, max_tokens=args.max_tokens, threads=args.threads,
                      dtype=args.dtype, base=args.base, machine_name=args.machine_name,
                      timeout_s=args.timeout, progress=not args.no_progress)
    run = run_bench(cfg, command=_command_line(args))
    obj = append_run(args.out, run)
    if args.json:
        emit_json(run)
    else:
        for line in compare_lines(run, previous["runs"]):
            print(line)
    failed = [v["label"] for v in run["variants"] if v["status"] != "ok"]
    status(f"wrote run {run['run_id']} to {args.out} ({len(obj['runs'])} runs in the file)"
           + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 0


def _command_line(args: argparse.Namespace) -> str:
    """The command as it was given (positional models, then every flag set away from its default)."""
    parts = ["slimlm", "bench", *args.models]
    for a in args.bench_actions:
        if not a.option_strings or a.dest in ("models", "help"):
            continue
        val = getattr(args, a.dest, None)
        if val is None or val is False or val == a.default:
            continue
        parts.append(a.option_strings[-1])
        if val is not True:
            parts += [str(x) for x in val] if isinstance(val, list) else [str(val)]
    return " ".join(shlex.quote(x) for x in parts)


def run_report_cmd(args: argparse.Namespace) -> int:
    from slimlm.report import write_report

    path, n = write_report(args.results, args.out, fmt=args.format, base=args.base)
    status(f"wrote {path} ({n} variants)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser("bench", help="measure variants with one protocol: perplexity, memory, speed",
                       description="Measure each MODEL (a variant) with one protocol and append the run to --out. "
                       "A variant is [LABEL=]MODEL[,dtype=fp32|bf16][,adapter=DIR][,dequantize=yes|no], MODEL an "
                       "alias, HF folder, slimlm output dir or .gguf file. Each variant runs in its own process; "
                       "timed rounds are interleaved (A, B, A, B ...). See docs/bench.md.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="variants to measure (the first is the base)")
    p.add_argument("--data", nargs="+", default=None, metavar="FILE",
                   help="text corpora for perplexity (default: Python's documentation text)")
    p.add_argument("--out", required=True, help="results JSON (created, or the run is appended)")
    p.add_argument("--base", default=None, help="label of the variant verdicts compare against (default: the first)")
    p.add_argument("--seq-len", type=int_arg(min=2), default=512, help="perplexity window (default 512)")
    p.add_argument("--max-tokens", type=int_arg(min=2), default=4096,
                   help="perplexity: score the first N tokens of each corpus (default 4096)")
    p.add_argument("--prompt-tokens", type=int_arg(min=1), default=128, help="prompt length (default 128)")
    p.add_argument("--new-tokens", type=int_arg(min=2), default=32, help="tokens generated per round (default 32)")
    p.add_argument("--concurrency", type=int_arg(min=1), default=4,
                   help="streams decoded together for the batched decode rate (default 4; 1 skips it)")
    p.add_argument("--repeats", type=int_arg(min=1), default=3, help="timed interleaved rounds (default 3)")
    p.add_argument("--warmup", type=int_arg(min=0), default=1, help="untimed rounds first (default 1)")
    p.add_argument("--timeout", type=int_arg(min=1), default=1800,
                   help="seconds one step of one variant may take before it is recorded as failed (default 1800)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="default compute dtype of the variants")
    p.add_argument("--threads", type=int_arg(min=1), default=None, help="torch threads per variant (default: all cores)")
    p.add_argument("--machine-name", default=None, help="label of this machine in reports (default: host name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_arg(p)
    p.set_defaults(func=run_bench_cmd, bench_actions=p._actions)

    p = sub.add_parser("report", help="HTML (or Markdown) report of bench results: tables, Pareto plots, verdicts")
    p.add_argument("results", nargs="+", metavar="RESULTS", help="results JSON files written by slimlm bench")
    p.add_argument("--out", required=True, help="report file (.html, or .md for Markdown)")
    p.add_argument("--format", choices=["html", "md"], default=None, help="default: from --out's suffix (html)")
    p.add_argument("--base", default=None, help="compare against this variant label (default: each run's base)")
    p.set_defaults(func=run_report_cmd)
