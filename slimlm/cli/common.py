"""Shared CLI pieces: model/dtype/thread flags, numeric flag types, JSON output, the stderr status printer.

Every numeric flag of every command takes a range-checked type, so bad numbers fail at parse time
(one ``error: argument --flag: expects ...`` line, exit 2) before anything is loaded or written:
``p.add_argument("--stride", type=int_arg(min=1))``. Flags generated from config dataclasses get the
same type from their field metadata (``slimlm.utils.config``). ``tests/cli/test_bad_input.py`` walks
the parser and fails on any numeric flag it does not cover.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from slimlm.utils.config import Bounds, NumberArg

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def int_arg(**limits: float) -> NumberArg:
    """argparse type: an integer within ``min``/``max`` (inclusive), ``gt``/``lt`` (strict)."""
    return NumberArg(int, Bounds(**limits))


def float_arg(**limits: float) -> NumberArg:
    """argparse type: a finite float within ``min``/``max`` (inclusive), ``gt``/``lt`` (strict)."""
    return NumberArg(float, Bounds(**limits))


def kv_policy_arg(text: str):  # type: ignore[no-untyped-def]
    """argparse type of ``--kv-policy``: a :class:`slimlm.models.kv_policy.KVPolicy` (one error line otherwise)."""
    from slimlm.models.kv_policy import KVPolicy
    from slimlm.utils.errors import ConfigError

    try:
        return KVPolicy.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HF folder, .gguf file, slimlm output dir, alias (smollm2-135m) or hub id")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="compute dtype (default fp32; fp16 is never used on CPU)")
    p.add_argument("--threads", type=int_arg(min=1), default=None, help="torch threads (default: all cores)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--dequantize", dest="dequantize", action="store_true", default=None,
                   help="GGUF: de-quantize every tensor to float (default: run the quantized types natively)")
    g.add_argument("--no-dequantize", dest="dequantize", action="store_false",
                   help="GGUF: fail on a tensor type slimlm cannot run natively instead of de-quantizing it")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (for scripts)")


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", None) is not None:
        torch.set_num_threads(args.threads)


def status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit_json(obj: dict[str, Any]) -> None:
    print(json.dumps(obj, default=str), flush=True)


def load(args: argparse.Namespace, dense: bool = False):  # type: ignore[no-untyped-def]
    """The model of ``args``; ``dense``: commands that compress it again start from float weights."""
    from slimlm.loaders import load_model

    apply_threads(args)
    deq = True if dense else getattr(args, "dequantize", None)
    return load_model(args.model, dtype=DTYPES[getattr(args, "dtype", "fp32")], dequantize=deq)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"
