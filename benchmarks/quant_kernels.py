"""Matmul speed of the quantized linears on SmolLM2-135M shapes, batch 1 and 16, one run, one CPU.

Variants (``y = x @ W.T`` for one linear): dense fp32 / bf16 (``F.linear``), the raw int8 and int4
kernels with fp32 vs bf16 activations (why the modules convert at the boundary), and every module's
``forward`` on fp32 inputs (what the model runtime calls): ``Int8WeightLinear`` (per channel),
``Int4WeightLinear`` g128 (576-wide rows run as kernel groups of 64), ``NF4Linear``, ``W8A8Linear``.
Weights are random (speed does not depend on values). Each cell is the median of ``--repeats`` timed
calls after warm-up, with the caches flushed before each call (``--cache hot`` keeps the weights
cached, which flatters small fp32 matrices: decode streams every layer from memory);
GB/s = bytes of weight storage read per call / time. The table and a JSON (with
``torch.backends.cpu.get_cpu_capability()`` and the CPU model) are written; compare numbers only
within one run (the machine is shared).

    .venv/bin/python benchmarks/quant_kernels.py                      # full: all shapes, 50 repeats
    .venv/bin/python benchmarks/quant_kernels.py --quick              # smoke: small shapes, 5 repeats
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from slimlm.bench.sysinfo import save_json, system_info  # noqa: E402
from slimlm.bench.timing import time_call  # noqa: E402
from slimlm.quant.kernels import int4_mm  # noqa: E402
from slimlm.quant.linear import (  # noqa: E402
    Int4WeightLinear,
    Int8WeightLinear,
    NF4Linear,
    W8A8Linear,
    persistent_nbytes,
)
from slimlm.quant.nf4 import quantize_nf4  # noqa: E402
from slimlm.quant.qtensor import QuantizedWeight  # noqa: E402

SHAPES = [(576, 576), (576, 1536), (1536, 576), (576, 49152)]  # (in, out): q/o, gate/up, down, lm_head
QUICK_SHAPES = [(576, 576), (1536, 576)]


def random_qw(out: int, inp: int, bits: int, group: int, sym: bool) -> QuantizedWeight:
    ng = -(-inp // group)
    q = torch.randint(0, 2**bits, (out, inp), dtype=torch.uint8)
    zero = torch.full((out, ng), 2 ** (bits - 1)) if sym else torch.randint(0, 2**bits, (out, ng))
    return QuantizedWeight(q, torch.rand(out, ng) * 0.01 + 1e-3, zero.to(torch.int32), bits, group, sym)


def bench_shape(inp: int, out: int, batch: int, repeats: int, cold: bool) -> list[dict[str, Any]]:
    w = torch.randn(out, inp) * 0.02
    x32 = torch.randn(batch, inp)
    xbf = x32.bfloat16()
    w_bf = w.bfloat16()
    i8 = Int8WeightLinear.from_quantized(random_qw(out, inp, 8, inp, True))
    i4 = Int4WeightLinear.from_quantized(random_qw(out, inp, 4, 128, False))
    nf4 = NF4Linear.from_quantized(quantize_nf4(w, 64, True))
    w8a8 = W8A8Linear.from_quantized(random_qw(out, inp, 8, inp, True))
    s32, sbf = i8.scale[:, 0].contiguous(), i8.scale[:, 0].bfloat16()
    sz = i4._scales_zeros
    packed, kg = i4._packed, i4._kernel_group
    cells: list[tuple[str, Callable[[], Any], int]] = [
        ("fp32 dense", lambda: F.linear(x32, w), w.numel() * 4),
        ("bf16 dense", lambda: F.linear(xbf, w_bf), w.numel() * 2),
        ("int8 kernel, fp32 act", lambda: torch.ops.aten._weight_int8pack_mm(x32, i8.weight, s32), persistent_nbytes(i8)),
        ("int8 kernel, bf16 act", lambda: torch.ops.aten._weight_int8pack_mm(xbf, i8.weight, sbf), persistent_nbytes(i8)),
        ("Int8WeightLinear(fp32 x)", lambda: i8(x32), persistent_nbytes(i8)),
        ("Int8WeightLinear(bf16 x)", lambda: i8(xbf), persistent_nbytes(i8)),
    ]
    if packed is not None and sz is not None:
        sz32 = sz.float()
        cells += [
            ("int4 g128 kernel, fp32 act", lambda: int4_mm(x32, packed, kg, sz32), persistent_nbytes(i4)),
            ("int4 g128 kernel, bf16 act", lambda: int4_mm(xbf, packed, kg, sz), persistent_nbytes(i4)),
        ]
    cells += [
        ("Int4WeightLinear g128(fp32 x)", lambda: i4(x32), persistent_nbytes(i4)),
        ("Int4WeightLinear g128(bf16 x)", lambda: i4(xbf), persistent_nbytes(i4)),
        ("NF4Linear(fp32 x)", lambda: nf4(x32), persistent_nbytes(nf4)),
        ("NF4Linear(bf16 x)", lambda: nf4(xbf), persistent_nbytes(nf4)),
        ("W8A8Linear(fp32 x)", lambda: w8a8(x32), persistent_nbytes(w8a8)),
    ]
    rows = []
    for name, fn, nbytes in cells:
        ms = time_call(fn, repeats, cold) * 1e3  # the protocol's timing function (median after warm-up)
        rows.append({"in": inp, "out": out, "batch": batch, "variant": name, "ms": round(ms, 4),
                     "weight_bytes": nbytes, "gb_s": round(nbytes / (ms / 1e3) / 1e9, 2)})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    shapes = sorted({(r["in"], r["out"], r["batch"]) for r in rows}, key=lambda s: (s[2], s[0] * s[1]))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["in"], r["out"], r["batch"], r["variant"]): r for r in rows}
    head = "| variant | " + " | ".join(f"{i}x{o} b{b}" for i, o, b in shapes) + " |"
    print(head)
    print("|---" * (len(shapes) + 1) + "|")
    for v in variants:
        vals = []
        for i, o, b in shapes:
            r = cell.get((i, o, b, v))
            vals.append("-" if r is None else f"{r['ms']:.3f} ms ({r['gb_s']:.0f} GB/s)")
        print(f"| {v} | " + " | ".join(vals) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--quick", action="store_true", help="small shapes, 5 repeats (smoke test)")
    ap.add_argument("--cache", choices=["cold", "hot"], default="cold",
                    help="cold: flush the caches before each timed call (decode-like); hot: weights stay cached")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    ap.add_argument("--out", default="bench-results/quant_kernels.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = 5 if args.quick else args.repeats
    rows: list[dict[str, Any]] = []
    for inp, out in shapes:
        for b in args.batches:
            rows += bench_shape(inp, out, b, repeats, args.cache == "cold")
            print(f"done {inp}x{out} batch {b}", file=sys.stderr)
    info = system_info()
    print(f"CPU: {info['cpu_model']} | capability {info['cpu_capability']} | threads {info['threads']} | "
          f"torch {info['torch']} | load {info['loadavg_1m']:.1f} | caches {args.cache}")
    print_table(rows)
    print(f"saved {save_json({'system': info, 'repeats': repeats, 'cache': args.cache, 'results': rows}, args.out)}")


if __name__ == "__main__":
    main()
