"""The ``slimlm`` command line: one sub-command module per capability.

Each module in COMMANDS has ``register(subparsers)`` that adds its parsers and sets ``func``.
User errors (SlimlmError, and bad flags while parsing) print one ``error: ...`` line and exit 2;
``--debug`` shows tracebacks. ``main(argv)`` returns the exit code instead of exiting, for tests.
Nothing is parsed at import time.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from slimlm.utils.errors import SlimlmError

# Command modules, in --help order. A new capability adds its module here.
COMMANDS = [
    "slimlm.cli.basic",  # info, eval, generate, export
    "slimlm.cli.demo",
    "slimlm.cli.quantize",
    "slimlm.cli.prune",
    "slimlm.cli.factorize",
    "slimlm.cli.convert_gqa",
    "slimlm.cli.finetune",  # finetune, merge
    "slimlm.cli.distill",
    "slimlm.cli.serve",
    "slimlm.cli.bench",  # bench, report
    "slimlm.cli.plan",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="slimlm", description="Compress, evaluate and run LLMs on CPU.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        # every listed command must import: a renamed or missing module is an error, never a silently absent command
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("SLIMLM_DEBUG") == "1"
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a bad flag (one "error:" line already printed) or --help: return its code
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except SlimlmError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # an internal bug: keep the one-line contract, point at --debug
        if debug:
            raise
        print(f"error: internal error ({type(e).__name__}: {e}); rerun with --debug for the traceback",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
