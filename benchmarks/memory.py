"""Resident memory after load vs the weights' bytes, per variant, and paired decode A/B of two checkouts.

Why: issue 17 item 6. The goal is ``RSS after load <= 1.15 x weight bytes + 40 MB``, where

- *RSS after load* = RSS after ``load_model`` and one forward (a 16-token prefill and one cached
  decode step), heap trimmed (``malloc_trim``), minus the RSS of the same process just before the
  load (Python, torch, slimlm and its compiled kernels already imported and loaded);
- *weight bytes* = the bytes of the model's tensors in their format: every distinct tensor of its
  ``state_dict()`` once (codes packed as saved, scales, zeros, norms, embedding in the load dtype;
  a tied head counted once).

Each measurement runs in a fresh subprocess, with ``PYTHONPATH`` set to the checkout under test, so
``--ab /work/main`` measures the same variants with another checkout's code (memory and decode
tok/s, in interleaved rounds: on a shared machine only the paired ratios mean something).

Quantized variants are made once (RTN; GPTQ with a small calibration from WikiText-2's calibration
part, act-order on as GPTQ's default) into ``--models`` and reused.

GPTQ variants need the WikiText-2 calibration text (``--calib``, default the shared data folder); without
it they are skipped with a note (the other rows still run).

``--ab-ref COMMIT`` extracts that commit of this repository (``git archive``) into a temp folder and
measures it as the "before" side: the table then has RSS and decode tok/s before and after per row.
The before side of issue 17 item 6 is ``87743c3`` (the commit before the memory work). The one command
that prints the full table and saves the JSON::

    .venv/bin/python benchmarks/memory.py --ab-ref 87743c3 --rounds 3 --out benchmarks/results/memory.json

Others::

    .venv/bin/python benchmarks/memory.py --only bf16,rtn-w4g128 --ab /work/main --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# the shared data folder sits beside the checkout (or beside its worktree folder)
WIKI = next((p / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw" for p in (ROOT.parent, ROOT.parent.parent)
             if (p / "shared" / "data").is_dir()), ROOT.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw")
MB = 1e6

_G128 = {"group_size": 128, "ragged_last_group": True}
_GPTQ_CALIB = {"n_samples": 8, "seq_len": 256}  # small: the layout, not the accuracy, is measured here
# name -> (load dtype, quantization config or None for the float model)
VARIANTS: dict[str, tuple[str, dict[str, Any] | None]] = {
    "fp32": ("fp32", None),
    "bf16": ("bf16", None),
    "rtn-w8": ("bf16", {"kind": "rtn", "bits": 8, "group_size": -1, "symmetric": True}),
    "rtn-w4g128": ("bf16", {"kind": "rtn", "bits": 4, **_G128}),
    "rtn-w3g128": ("bf16", {"kind": "rtn", "bits": 3, **_G128}),
    "gptq-w8": ("bf16", {"kind": "gptq", "bits": 8, "group_size": -1, "symmetric": True}),
    "gptq-w4g128": ("bf16", {"kind": "gptq", "bits": 4, **_G128}),
    "gptq-w3g128": ("bf16", {"kind": "gptq", "bits": 3, **_G128}),
    "nf4": ("bf16", {"kind": "nf4"}),
}


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _trim() -> None:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def state_dict_bytes(model: Any) -> int:
    """Bytes of the model's tensors in their format: each distinct storage of ``state_dict()`` once."""
    seen: set[int] = set()
    total = 0
    for t in model.state_dict().values():
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def child(spec: str, dtype_name: str, decode_tokens: int, quantized: bool) -> dict[str, Any]:
    """One measurement in this (fresh) process: RSS delta of load + one forward, then decode tok/s."""
    import torch

    from slimlm import kernels
    from slimlm.loaders import describe, load_model
    from slimlm.models.kv_cache import KVCache

    kernels.load()
    torch.manual_seed(0)
    ids = torch.randint(100, 1000, (1, 16))
    _trim()
    rss0 = current_rss()
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    t0 = time.perf_counter()
    # the float rows are the de-quantized model: a GGUF loads natively (quantized) by default since issue 18
    import inspect

    kw = {"dequantize": True} if "dequantize" in inspect.signature(load_model).parameters and not quantized else {}
    lm = load_model(spec, dtype=dtype, **kw)
    load_s = time.perf_counter() - t0
    model = lm.model
    cache = KVCache.for_model(model.config, 1, 16 + decode_tokens + 4, model.dtype)
    cache_bytes = sum(t.numel() * t.element_size() for t in (cache.k, cache.v))
    with torch.inference_mode():
        nxt = model(ids, cache=cache, last_only=True).float().argmax(-1)  # [1, 1]
        nxt = model(nxt, cache=cache, last_only=True).float().argmax(-1)
    _trim()
    rss_load = current_rss() - rss0 - cache_bytes  # the KV cache is the forward's, not the load's
    d = describe(lm)
    res: dict[str, Any] = {"rss_after_load_bytes": rss_load, "load_seconds": load_s,
                           "info_size_in_memory_bytes": d["size_in_memory_bytes"],
                           "module_kinds": d["compressed_modules"]}
    if decode_tokens:
        with torch.inference_mode():
            for _ in range(2):  # warm-up
                nxt = model(nxt, cache=cache, last_only=True).float().argmax(-1)
            t = time.perf_counter()
            for _ in range(decode_tokens):
                nxt = model(nxt, cache=cache, last_only=True).float().argmax(-1)
            res["decode_tok_s"] = decode_tokens / (time.perf_counter() - t)
    res["weight_bytes"] = state_dict_bytes(model)  # after the RSS reading (an int4 state_dict repacks)
    return res


def _extract(ref: str, folder: Path) -> Path:
    """The tree of commit ``ref`` of this repository in ``folder/src-<sha>`` (made once, reused)."""
    sha = subprocess.run(["git", "rev-parse", "--verify", f"{ref}^{{commit}}"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout.strip()
    out = folder / f"src-{sha[:12]}"
    if not (out / "slimlm").is_dir():
        tmp = folder / f".src-{sha[:12]}.tmp-{os.getpid()}"
        tmp.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", sha], cwd=ROOT, check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tmp)], input=archive, check=True)
        tmp.rename(out)
    return out


def make_models(names: list[str], folder: Path, model: str, calib: Path) -> dict[str, str]:
    """Model spec per variant: the base model for float variants, else a quantized folder (made once)."""
    specs: dict[str, str] = {}
    for name in names:
        cfg = VARIANTS[name][1]
        if cfg is None:
            specs[name] = model
            continue
        out = folder / name
        if not (out / "slimlm.json").is_file():
            cmd = [sys.executable, "-m", "slimlm.cli.main", "quantize", model, "--out", str(out), "--no-progress",
                   "--recipe", str(_recipe(folder, name, cfg))]
            if cfg["kind"] == "gptq":
                cmd += ["--calib", str(calib), "--calib-start-char", "400000",
                        "--n-samples", str(_GPTQ_CALIB["n_samples"]), "--seq-len", str(_GPTQ_CALIB["seq_len"])]
            print("making", name, file=sys.stderr)
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        specs[name] = str(out)
    return specs


def _recipe(folder: Path, name: str, cfg: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / f"{name}.json"
    p.write_text(json.dumps(cfg))
    return p


def run_child(root: Path, spec: str, dtype: str, decode_tokens: int, threads: int, quantized: bool) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", spec, "--dtype", dtype,
           "--decode-tokens", str(decode_tokens)] + (["--quantized"] if quantized else [])
    out = subprocess.run(cmd, check=True, cwd=root, env=env, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated variants (default all): " + ",".join(VARIANTS))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--models", default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "slimlm-memory-models"),
                    help="folder for the quantized variants (made once, reused)")
    ap.add_argument("--ab", help="another checkout to measure side by side (e.g. /work/main)")
    ap.add_argument("--ab-ref", help="a commit of this repository to measure side by side (extracted to a temp folder)")
    ap.add_argument("--calib", default=str(WIKI), help="calibration text for the GPTQ variants")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds per variant (medians reported)")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", help="JSON results file")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", default="bf16", help=argparse.SUPPRESS)
    ap.add_argument("--quantized", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.dtype, args.decode_tokens, args.quantized)))
        return 0

    sys.path.insert(0, str(ROOT))
    from slimlm.bench.sysinfo import save_json, system_info

    names = args.only.split(",") if args.only else list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}")
    if not Path(args.calib).is_file():
        skipped = [n for n in names if (VARIANTS[n][1] or {}).get("kind") == "gptq"]
        if skipped:
            print(f"skipping {', '.join(skipped)}: no calibration text at {args.calib}", file=sys.stderr)
        names = [n for n in names if n not in skipped]
    specs = make_models(names, Path(args.models), args.model, Path(args.calib))
    old = Path(args.ab) if args.ab else _extract(args.ab_ref, Path(args.models)) if args.ab_ref else None
    roots = {"new": ROOT, **({"old": old} if old else {})}
    for root in roots.values():  # build each side's kernels first (not inside a measured process)
        subprocess.run([sys.executable, "-m", "slimlm.kernels"], check=True, cwd=root,
                       env={**os.environ, "PYTHONPATH": str(root)})
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {n: {k: [] for k in roots} for n in names}
    for r in range(args.rounds):
        for name in names:
            order = list(roots) if r % 2 == 0 else list(roots)[::-1]
            for k in order:
                runs[name][k].append(run_child(roots[k], specs[name], VARIANTS[name][0], args.decode_tokens,
                                               args.threads, VARIANTS[name][1] is not None))
    rows = []
    for name in names:
        row: dict[str, Any] = {"variant": name, "dtype": VARIANTS[name][0]}
        for k, rs in runs[name].items():
            rss = statistics.median(x["rss_after_load_bytes"] for x in rs)
            w = rs[0]["weight_bytes"]
            row[k] = {"rss_after_load_bytes": rss, "weight_bytes": w, "ratio": rss / w,
                      "goal_bytes": 1.15 * w + 40 * MB, "within_goal": rss <= 1.15 * w + 40 * MB,
                      "info_size_in_memory_bytes": rs[0]["info_size_in_memory_bytes"],
                      "decode_tok_s": [x.get("decode_tok_s") for x in rs]}
        if "old" in row and args.decode_tokens:
            pairs = zip(row["new"]["decode_tok_s"], row["old"]["decode_tok_s"], strict=True)
            row["decode_ratio_new_over_old"] = statistics.median(a / b for a, b in pairs)
        rows.append(row)
        _print_row(row)
    res = {"system": system_info(), "roots": {k: str(v) for k, v in roots.items()}, "rounds": args.rounds,
           "decode_tokens": args.decode_tokens, "gptq_calibration": _GPTQ_CALIB, "rows": rows}
    if args.out:
        save_json(res, args.out)
    return 0


def _print_row(row: dict[str, Any]) -> None:
    parts = [f"{row['variant']:>12}"]
    for k in ("old", "new"):
        if k in row:
            x = row[k]
            tok = statistics.median(t for t in x["decode_tok_s"] if t) if any(x["decode_tok_s"]) else float("nan")
            parts.append(f"{k}: RSS {x['rss_after_load_bytes'] / MB:7.1f} MB / weights {x['weight_bytes'] / MB:6.1f} MB"
                         f" (goal {x['goal_bytes'] / MB:6.1f}, {'ok' if x['within_goal'] else 'OVER'}),"
                         f" info {x['info_size_in_memory_bytes'] / MB:6.1f} MB, {tok:6.1f} tok/s")
    if "decode_ratio_new_over_old" in row:
        parts.append(f"decode new/old {row['decode_ratio_new_over_old']:.2f}")
    print(" | ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
