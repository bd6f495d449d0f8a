"""Every numeric flag of every command refuses bad values at parse time: exit 2, one line, no files.

Issue 17 item 3: ``eval --stride 0`` hung, ``--max-tokens -5`` silently dropped tokens, ``--threads
0`` was accepted. The table below is explicit (command -> flag -> invalid values, plus one valid
value that must parse); ``test_table_covers_every_numeric_flag`` walks the built parser and fails
on any numeric flag (plain ``type=int/float`` or a range type) the table misses, so a new flag
cannot escape it. Run: ``.venv/bin/pytest tests/cli/test_bad_input.py``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimlm.cli.main import build_parser, main
from slimlm.utils.config import NumberArg

NOT_INT = ["abc", "1.5"]
NOT_FINITE = ["abc", "nan", "inf", "-inf"]
RUNTIME = {"--threads": (["0", "-1", *NOT_INT], "2")}
CALIB = {"--calib-start-char": (["-1", *NOT_INT], "400000"), "--calib-samples": (["0", "-3", *NOT_INT], "8"),
         "--calib-seq-len": (["0", "1", *NOT_INT], "64"), "--seed": (["-1", *NOT_INT], "3")}

# command -> (argv prefix, valid except for the flag; the model path does not exist, so a value that
# slipped through parsing fails on the model, not the flag) and flag -> (invalid values, a valid one)
TABLE: dict[str, tuple[list[str], dict[str, tuple[list[str], str]]]] = {
    "info": (["info", "{model}"], {**RUNTIME}),
    "eval": (["eval", "{model}"], {
        "--seq-len": (["0", "1", "-4", *NOT_INT], "128"), "--stride": (["0", "-1", *NOT_INT], "64"),
        "--max-tokens": (["0", "-5", *NOT_INT], "1000"), "--start-char": (["-1", *NOT_INT], "10"),
        "--stream-chunk": (["0", "-1", *NOT_INT], "4"), "--score-last": (["0", "-1", *NOT_INT], "100"), **RUNTIME}),
    "generate": (["generate", "{model}", "--prompt", "hi"], {
        "--max-new-tokens": (["0", "-1", *NOT_INT], "16"), "--temperature": (["-0.1", *NOT_FINITE], "0.7"),
        "--top-k": (["-1", *NOT_INT], "40"), "--top-p": (["0", "1.01", "-0.5", *NOT_FINITE], "0.9"),
        "--repetition-penalty": (["0", "-1", *NOT_FINITE], "1.1"), "--seed": (["-1", *NOT_INT], "7"),
        **RUNTIME}),
    "export": (["export", "{model}", "--to", "hf", "{out}"], {**RUNTIME}),
    "demo": (["demo", "--model", "{model}", "--out", "{out}"], {
        "--ppl-tokens": (["0", "1", "32769", *NOT_INT], "512"), "--seq-len": (["0", "1", *NOT_INT], "128"),
        "--prompt-tokens": (["0", "-1", *NOT_INT], "16"), "--new-tokens": (["0", "1", *NOT_INT], "8"),
        "--concurrency": (["0", "-2", *NOT_INT], "2"), "--repeats": (["0", "-1", *NOT_INT], "2"),
        "--warmup": (["-1", *NOT_INT], "0"), "--calib-samples": (["0", "-3", *NOT_INT], "8"),
        "--calib-seq-len": (["0", "1", *NOT_INT], "64"), "--lora-steps": (["0", "-1", *NOT_INT], "2"),
        "--lora-seq-len": (["0", "7", *NOT_INT], "64"), "--max-ppl-increase": (["-0.1", *NOT_FINITE], "0.05"),
        "--chat-tokens": (["0", "-1", *NOT_INT], "16"), **RUNTIME}),
    "quantize": (["quantize", "{model}", "--method", "gptq", "--calib", "{model}.txt", "--out", "{out}"], {
        **CALIB, "--n-samples": (["0", "-1", *NOT_INT], "8"), "--seq-len": (["0", "1", *NOT_INT], "128"),
        "--bits": (["0", "1", "9", "-4", *NOT_INT], "3"), "--group-size": (["-2", *NOT_INT], "-1"),
        "--n-grid": (["0", "-1", *NOT_INT], "10"), "--clip-grid": (["0", *NOT_INT], "10"),
        "--max-shrink": (["-0.1", "1", *NOT_FINITE], "0.3"), "--damp": (["-0.01", "1", *NOT_FINITE], "0.1"),
        "--block-size": (["0", "-1", *NOT_INT], "64"), "--threshold": (["0", "-6", *NOT_FINITE], "3.5"),
        "--max-outlier-fraction": (["-0.1", "1.5", *NOT_FINITE], "0.1"),
        "--alpha": (["-0.1", "1.5", *NOT_FINITE], "0.8"), **RUNTIME}),
    "prune": (["prune", "{model}", "--out", "{out}"], {
        "--sparsity": (["-0.1", "1", "1.5", *NOT_FINITE], "0.6"),
        "--schedule-delta": (["1", "-1", *NOT_FINITE], "0.1"), "--blocksize": (["0", "-1", *NOT_INT], "64"),
        "--dampening": (["-0.1", "1", *NOT_FINITE], "0.05"), "--bits": (["-1", "9", *NOT_INT], "4"),
        "--group-size": (["-2", *NOT_INT], "64"), "--target-ratio": (["-0.1", "1", *NOT_FINITE], "0.7"),
        "--remove-layers": (["-2", *NOT_INT], "1"), "--kv-groups": (["-2", *NOT_INT], "1"),
        "--intermediate-size": (["-2", *NOT_INT], "64"), "--layer-share": (["-0.1", "1.1", *NOT_FINITE], "0.5"),
        "--head-share": (["-0.1", "1.1", *NOT_FINITE], "0.5"), "--round-to": (["0", "-32", *NOT_INT], "16"),
        **CALIB, **RUNTIME}),
    "factorize": (["factorize", "{model}", "--out", "{out}"], {
        "--ratio": (["0", "-0.5", "1.5", *NOT_FINITE], "0.5"), "--energy": (["-0.1", "1.1", *NOT_FINITE], "0.9"),
        "--rank": (["-1", *NOT_INT], "8"), "--damp": (["-0.1", "1", *NOT_FINITE], "0.1"), **CALIB, **RUNTIME}),
    "convert-gqa": (["convert-gqa", "{model}", "--out", "{out}"], {
        "--kv-heads": (["0", "-1", *NOT_INT], "2"), **CALIB, **RUNTIME}),
    "finetune": (["finetune", "{model}", "--data", "{model}.jsonl", "--out", "{out}"], {
        "--r": (["0", "-1", *NOT_INT], "16"), "--lora-alpha": (["0", "-1", *NOT_FINITE], "32"),
        "--lora-dropout": (["-0.1", "1", *NOT_FINITE], "0.05"), "--lora-plus-ratio": (["-1", *NOT_FINITE], "16"),
        "--num-virtual-tokens": (["0", "-1", *NOT_INT], "8"), "--max-steps": (["0", "-1", *NOT_INT], "2"),
        "--batch-size": (["0", "-1", *NOT_INT], "2"), "--grad-accum": (["0", "-1", *NOT_INT], "4"),
        "--seq-len": (["0", "1", *NOT_INT], "128"), "--lr": (["0", "-1e-4", *NOT_FINITE], "1e-4"),
        "--weight-decay": (["-0.1", *NOT_FINITE], "0.01"), "--warmup-steps": (["-1", *NOT_INT], "10"),
        "--min-lr-ratio": (["-0.1", "1.5", *NOT_FINITE], "0.1"), "--max-grad-norm": (["-1", *NOT_FINITE], "1.0"),
        "--eval-every": (["-1", *NOT_INT], "10"), "--eval-fraction": (["-0.1", "1", *NOT_FINITE], "0.1"),
        "--save-every": (["-1", *NOT_INT], "50"), "--keep-checkpoints": (["0", "-1", *NOT_INT], "3"),
        "--log-every": (["0", "-1", *NOT_INT], "5"), "--seed": (["-1", *NOT_INT], "1"), **RUNTIME}),
    "merge": (["merge", "{model}", "--adapter", "{model}", "--out", "{out}"], {**RUNTIME}),
    "serve": (["serve", "{model}"], {
        "--port": (["-1", "65536", *NOT_INT], "8001"), "--max-waiting": (["-1", *NOT_INT], "8"),
        "--num-blocks": (["-1", *NOT_INT], "64"), "--kv-budget-gib": (["0", "-1", *NOT_FINITE], "0.5"),
        "--block-size": (["0", "-16", *NOT_INT], "16"), "--max-num-seqs": (["0", "-1", *NOT_INT], "4"),
        "--max-num-batched-tokens": (["0", "-1", *NOT_INT], "256"),
        "--num-speculative-tokens": (["0", "17", *NOT_INT], "4"),
        "--self-keep-layers": (["0", "1.5", *NOT_FINITE], "0.5"), "--ngram-max": (["0", "-1", *NOT_INT], "3"),
        "--ngram-min": (["0", "-1", *NOT_INT], "1"), "--probe-interval": (["0", "-1", *NOT_INT], "16"), **RUNTIME}),
    "bench": (["bench", "{model}", "--out", "{out}"], {
        "--seq-len": (["0", "1", *NOT_INT], "64"), "--max-tokens": (["0", "1", "-5", *NOT_INT], "256"),
        "--prompt-tokens": (["0", "-1", *NOT_INT], "16"), "--new-tokens": (["0", "1", *NOT_INT], "8"),
        "--concurrency": (["0", "-2", *NOT_INT], "2"), "--repeats": (["0", "-1", *NOT_INT], "2"),
        "--warmup": (["-1", *NOT_INT], "0"), "--timeout": (["0", "-5", *NOT_INT], "60"), **RUNTIME}),
    "report": (["report", "{model}", "--out", "{out}"], {}),
    "plan": (["plan", "{model}"], {
        "--context": (["0", "-1", *NOT_INT], "512"), "--batch": (["0", "-2", *NOT_INT], "4"),
        "--block-size": (["0", "-16", *NOT_INT], "16"), "--batched-tokens": (["0", "-1", *NOT_INT], "128"),
        "--seq-len": (["0", "-1", *NOT_INT], "256"), "--lora-rank": (["0", "-8", *NOT_INT], "8"),
        "--galore-rank": (["0", "-1", *NOT_INT], "64"), "--calib-samples": (["0", "-3", *NOT_INT], "8"),
        "--calib-seq-len": (["0", "1", *NOT_INT], "64"), "--flops": (["0", "-1e18", *NOT_FINITE], "1e18"),
        "--cpu-hours": (["0", "-2", *NOT_FINITE], "1.5"), "--tokens": (["0", "-5", *NOT_FINITE], "1e9"),
        "--memory-gib": (["0", "-1", *NOT_FINITE], "8"), "--kv-budget-gib": (["0", "-0.5", *NOT_FINITE], "0.5")}),
}

_TRAIN = ("--max-steps", "--batch-size", "--grad-accum", "--seq-len", "--lr", "--weight-decay", "--warmup-steps",
          "--min-lr-ratio", "--max-grad-norm", "--eval-every", "--eval-fraction", "--save-every",
          "--keep-checkpoints", "--log-every", "--seed", "--threads")
TABLE["distill"] = (["distill", "{model}", "--data", "{model}.jsonl", "--out", "{out}"], {
    "--acceptance-prompts": (["-1", *NOT_INT], "8"), "--acceptance-tokens": (["0", "-1", *NOT_INT], "32"),
    "--layers": (["-1", *NOT_INT], "4"), "--temperature": (["0", "-1", *NOT_FINITE], "2.0"),
    "--alpha": (["-0.1", "1.5", *NOT_FINITE], "0.5"), "--hidden-weight": (["-1", *NOT_FINITE], "1.0"),
    "--sequence-kd-tokens": (["-1", *NOT_INT], "16"), "--on-policy-every": (["-1", *NOT_INT], "4"),
    "--on-policy-tokens": (["0", "-1", *NOT_INT], "32"),
    **{f: TABLE["finetune"][1][f] for f in _TRAIN}})

CASES = [(cmd, flag, bad) for cmd, (_, flags) in TABLE.items() for flag, (bads, _) in flags.items() for bad in bads]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    p = build_parser()
    (sub,) = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def argv_for(cmd: str, tmp: Path) -> list[str]:
    return [a.format(model=tmp / "no-such-model", out=tmp / "out") for a in TABLE[cmd][0]]


@pytest.fixture(scope="module")
def imported() -> None:
    build_parser()  # import every command module once, so the timing below is the command's own


@pytest.mark.parametrize(("cmd", "flag", "bad"), CASES, ids=[f"{c} {f} {b}" for c, f, b in CASES])
def test_bad_number_is_one_error_line_and_exit_2(cmd, flag, bad, tmp_path, capsys, imported):
    t = time.perf_counter()
    code = main(argv_for(cmd, tmp_path) + [f"{flag}={bad}"])
    assert time.perf_counter() - t < 5
    assert code == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"error: argument {flag}: expects "), lines[0]  # refused by the parser itself
    assert repr(bad) in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("cmd", sorted(TABLE))
def test_valid_values_in_the_table_parse(cmd, tmp_path):
    parser = build_parser()
    dests = {s: a.dest for a in subcommands()[cmd]._actions for s in a.option_strings}  # aliases share a dest
    for flag, (_, good) in TABLE[cmd][1].items():
        args = parser.parse_args(argv_for(cmd, tmp_path) + [f"{flag}={good}"])
        dest = dests[flag]
        assert float(getattr(args, dest)) == float(good), (cmd, flag)


def test_table_covers_every_numeric_flag():
    missing, unchecked, stale = [], [], []
    commands = subcommands()
    assert set(commands) == set(TABLE), f"commands not in the table: {set(commands) ^ set(TABLE)}"
    for cmd, parser in commands.items():
        numeric = set()
        for action in parser._actions:
            if action.type in (int, float):  # a numeric flag without a range type
                unchecked.append(f"{cmd} {action.option_strings}")
            elif isinstance(action.type, NumberArg):
                numeric |= set(action.option_strings)
        flags = set(TABLE[cmd][1])
        missing += [f"{cmd} {f}" for f in sorted(numeric - flags)]
        stale += [f"{cmd} {f}" for f in sorted(flags - numeric)]
    assert not unchecked, f"numeric flags with plain type=int/float (use cli.common.int_arg/float_arg): {unchecked}"
    assert not missing, f"numeric flags missing from TABLE: {missing}"
    assert not stale, f"TABLE names flags the parser does not have: {stale}"


def test_reported_hangs_exit_2_in_a_real_process(tmp_path):
    """The three reported cases, end to end through ``python -m slimlm.cli.main``."""
    for argv in (["eval", "x", "--stride", "0"], ["eval", "x", "--max-tokens", "-5"], ["info", "x", "--threads", "0"]):
        r = subprocess.run([sys.executable, "-m", "slimlm.cli.main", *argv], capture_output=True, text=True,
                           timeout=120, cwd=Path(__file__).resolve().parents[2])
        lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
        assert r.returncode == 2 and len(lines) == 1 and argv[2] in lines[0], r.stderr


def test_recipe_values_are_range_checked_naming_the_key():
    from slimlm.engine.sampling import SamplingConfig
    from slimlm.utils.errors import ConfigError

    for data, key in (({"top_p": 0.0}, "top_p"), ({"max_new_tokens": -5}, "max_new_tokens"),
                      ({"temperature": float("nan")}, "temperature"), ({"repetition_penalty": "inf"}, "repetition_penalty")):
        with pytest.raises(ConfigError, match=f"'{key}' must be"):
            SamplingConfig.from_dict(data)
    assert SamplingConfig.from_dict({"top_p": 1.0, "top_k": 0}).top_p == 1.0
