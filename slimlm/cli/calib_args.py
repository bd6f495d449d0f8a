"""Calibration flags of every calibrated command (quantize, prune, factorize, convert-gqa): one rule.

A run whose config needs calibration data requires ``--calib``: a UTF-8 text file (e.g.
``../shared/data/wikitext-2-raw/wiki.test.raw --calib-start-char 400000``), or the explicit built-in
``--calib builtin:pydoc`` (Python's own documentation, present on every machine). The built-in text is
out of domain for most evaluation text and costs accuracy (REFERENCE.md: SparseGPT 50% on SmolLM2
41 -> 65 ppl), so choosing it prints a warning. Nothing calibrates silently on a default.

Same names everywhere: ``--calib``, ``--calib-start-char``, ``--calib-samples``, ``--calib-seq-len``,
``--seed``. ``quantize``'s old ``--n-samples`` / ``--seq-len`` are kept as hidden aliases.
Sampling follows the reference protocol (:func:`slimlm.calib.data.calibration_samples`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

from slimlm.cli.common import int_arg
from slimlm.utils.errors import SlimlmError

BUILTIN_PYDOC = "builtin:pydoc"
EXAMPLE = "../shared/data/wikitext-2-raw/wiki.test.raw --calib-start-char 400000"


def add_calib_args(p: argparse.ArgumentParser, used_by: str, old_names: bool = False) -> None:
    """Add the calibration flags; ``used_by`` says which methods read them (shown in --help)."""
    g = p.add_argument_group(f"calibration ({used_by})")
    g.add_argument("--calib", default=None, metavar="FILE",
                   help=f"UTF-8 text to calibrate on, required when the method calibrates (e.g. {EXAMPLE}); "
                        f"'{BUILTIN_PYDOC}' = Python's documentation (out of domain: prints a warning)")
    g.add_argument("--calib-start-char", type=int_arg(min=0), default=0,
                   help="use the text from this character on (WikiText-2 test: 400000; default 0)")
    g.add_argument("--calib-samples", type=int_arg(min=1), default=128, help="calibration windows (default 128)")
    g.add_argument("--calib-seq-len", type=int_arg(min=2), default=512, help="tokens per calibration window (default 512)")
    g.add_argument("--seed", type=int_arg(min=0), default=0, help="window sampling seed (default 0)")
    if old_names:  # deprecated spellings, hidden from --help
        g.add_argument("--n-samples", dest="calib_samples", type=int_arg(min=1), default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        g.add_argument("--seq-len", dest="calib_seq_len", type=int_arg(min=2), default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def check_calib_args(args: argparse.Namespace, needed: bool, what: str) -> None:
    """Validate the flags before any work: ``needed`` says whether this run calibrates."""
    if args.calib_samples < 1:
        raise SlimlmError(f"--calib-samples must be >= 1, got {args.calib_samples}")
    if args.calib_seq_len < 2:
        raise SlimlmError(f"--calib-seq-len must be >= 2, got {args.calib_seq_len}")
    if args.calib_start_char < 0:
        raise SlimlmError(f"--calib-start-char must be >= 0, got {args.calib_start_char}")
    if not needed:
        return
    if not args.calib:
        raise SlimlmError(f"{what} needs calibration text: pass --calib FILE (any UTF-8 text, e.g. {EXAMPLE}) "
                          f"or --calib {BUILTIN_PYDOC} (Python's documentation; out of domain, worse results)")
    if args.calib != BUILTIN_PYDOC and not Path(args.calib).is_file():
        raise SlimlmError(f"calibration file not found: {args.calib}")


class _Encoded:
    """A tokenizer stand-in returning already computed ids (tokenize the text once)."""

    def __init__(self, ids: list[int]) -> None:
        self.ids = ids

    def encode(self, text: str) -> list[int]:
        return self.ids


def calib_samples(args: argparse.Namespace, lm: Any) -> list[torch.Tensor]:
    """``--calib-samples`` windows ``[--calib-seq-len]`` of the calibration text (after check_calib_args)."""
    from slimlm.calib.data import calibration_samples, read_text

    if lm.tokenizer is None:
        raise SlimlmError(f"{args.model} has no tokenizer; calibration needs one")
    if args.calib == BUILTIN_PYDOC:
        print(f"warning: calibrating on {BUILTIN_PYDOC} (Python's documentation), which is out of domain for "
              "most text: expect worse results than with text like your evaluation data (REFERENCE.md: "
              "SparseGPT 50% 41 -> 65 ppl on SmolLM2)", file=sys.stderr, flush=True)
    text = read_text(None if args.calib == BUILTIN_PYDOC else args.calib, args.calib_start_char)
    ids = lm.tokenizer.encode(text)
    need = args.calib_samples * args.calib_seq_len
    if len(ids) < need:
        raise SlimlmError(f"calibration text {args.calib} has {len(ids):,} tokens, fewer than the {args.calib_samples} x "
                          f"{args.calib_seq_len} = {need:,} requested (use more text or fewer/shorter windows)")
    return calibration_samples(_Encoded(ids), text, args.calib_samples, args.calib_seq_len, seed=args.seed)


def calib_record(args: argparse.Namespace) -> dict[str, Any]:
    """What the run calibrated on, for the saved ``slimlm.json`` and ``--json`` output."""
    return {"file": args.calib, "start_char": args.calib_start_char, "n_samples": args.calib_samples,
            "seq_len": args.calib_seq_len, "seed": args.seed}
