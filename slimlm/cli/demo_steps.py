"""The pieces of ``slimlm demo``: its config, its variants (each made by one slimlm command line), the
cache that lets a re-run reuse them, the demo folder's ownership rule, and the "best variant" rule.

Why here and not in the commands: the demo only *drives* the capabilities. Each variant is the
output of the command a user would type (``slimlm quantize``, ``slimlm prune``, ``slimlm finetune``),
parsed by the same parser; the measurements are one ``slimlm bench`` run (``slimlm.bench.protocol``);
the report is ``slimlm report``'s. Nothing here times or transforms anything itself.

Cache: a variant's key is the SHA-256 of its command line (minus the output paths), the identity of
the source model (path, size, mtime) and slimlm's version; the bench run's key adds the bench
settings, the threads and the host. ``DIR/.slimlm-demo.json`` records the keys; an entry whose key
matches (and whose output is still there) is reused, anything else is made again (``--fresh``:
everything). Example::

    cfg = DemoConfig(ppl_tokens=1024)
    steps = plan_variants(cfg, "smollm2-135m", Path("slimlm-demo"))
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from slimlm.utils.config import BaseConfig
from slimlm.utils.errors import ConfigError, SlimlmError

STATE = ".slimlm-demo.json"  # the demo folder's marker and cache index
STATE_VERSION = 1
VARIANTS = ("fp32", "bf16", "gguf", "gptq", "wanda", "lora")


@dataclass
class DemoConfig(BaseConfig):
    """Sizes of the demo. The defaults keep the whole demo within about 10 minutes on 2 cores; the
    published protocols use far more (perplexity on 20480+ tokens, 128 x 512 calibration tokens)."""

    kind: ClassVar[str] = "demo"
    variants: str = field(default=",".join(VARIANTS), metadata={
        "help": "comma-separated variants to make and bench: fp32 (the base), bf16, gguf (the GGUF as shipped, "
                "its quantized types run natively; GGUF models only), gptq (GPTQ w4 g128), wanda (Wanda 2:4 "
                "sparsity), lora (a few LoRA steps on the built-in instruct data)"})
    ppl_tokens: int = field(default=2048, metadata={"help": "perplexity: tokens of the scored text", "min": 2,
                                                    "max": 32768})
    seq_len: int = field(default=512, metadata={"help": "perplexity window", "min": 2})
    prompt_tokens: int = field(default=64, metadata={"help": "prompt length of the timed rounds", "min": 1})
    new_tokens: int = field(default=32, metadata={"help": "tokens generated per timed round", "min": 2})
    concurrency: int = field(default=4, metadata={"help": "streams of the batched decode rate (1: skip it)", "min": 1})
    repeats: int = field(default=3, metadata={"help": "timed interleaved rounds", "min": 1})
    warmup: int = field(default=1, metadata={"help": "untimed rounds first", "min": 0})
    calib_samples: int = field(default=16, metadata={"help": "GPTQ / Wanda calibration windows", "min": 1})
    calib_seq_len: int = field(default=256, metadata={"help": "tokens per calibration window", "min": 2})
    lora_steps: int = field(default=4, metadata={"help": "LoRA optimizer steps", "min": 1})
    lora_seq_len: int = field(default=128, metadata={"help": "LoRA training window", "min": 8})
    max_ppl_increase: float = field(default=0.10, metadata={
        "help": "best variant: the fastest decode among those within this fraction of the base's perplexity",
        "min": 0})
    chat_tokens: int = field(default=48, metadata={"help": "tokens of the chat answer", "min": 1})

    def names(self) -> list[str]:
        names = [n.strip() for n in self.variants.split(",") if n.strip()]
        bad = [n for n in names if n not in VARIANTS]
        if bad or not names:
            raise ConfigError(f"demo: unknown variant {bad[0] if bad else '(none)'!r}; known: {', '.join(VARIANTS)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"demo: a variant is named twice in {self.variants!r}")
        return names

    def validate(self) -> None:
        self.names()


@dataclass
class Step:
    """One variant: how it is made (``argv``, a slimlm command line; None = nothing to make) and benched."""

    name: str
    label: str  # in the table and the report
    what: str  # one line for the progress output
    argv: list[str] | None
    out: Path | None  # the folder ``argv`` writes
    spec: str  # the ``slimlm bench`` variant
    key: str = ""


def slimlm_version() -> str:
    try:
        return importlib.metadata.version("slimlm")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def model_identity(model: str) -> dict[str, Any]:
    """What the source model is (path, and size + mtime of its files), so a changed model is not reused."""
    from slimlm.loaders.resolve import resolve

    path, kind = resolve(model)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return {"path": str(path.resolve()), "kind": kind,
            "files": [(p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in files]}


def calib_text_file(folder: Path) -> tuple[Path, str]:
    """The calibration text: the second half of Python's documentation (present on every machine), written
    once to ``folder/calib.txt``. The perplexity text is the *first* ``ppl_tokens`` tokens (at most 32768,
    about 120 000 characters) of the same text, so calibration and scoring share the domain and never overlap."""
    from slimlm.bench.results import write_text
    from slimlm.calib.data import default_text

    text = default_text()
    calib = text[len(text) // 2:]
    p = folder / "calib.txt"
    if not p.is_file() or p.read_text(encoding="utf-8") != calib:
        write_text(calib, p)
    return p, f"the second half of Python's documentation ({len(calib):,} characters from character {len(text) // 2:,})"


def plan_variants(cfg: DemoConfig, model: str, folder: Path, kind: str, calib: Path) -> list[Step]:
    """The steps of ``cfg.variants`` in order; fp32 (the base of every verdict) always first."""
    names = cfg.names()
    if "gguf" in names and kind != "gguf":
        names.remove("gguf")  # only a GGUF file has a native quantized form
    names = ["fp32"] + [n for n in names if n != "fp32"]
    deq = ",dequantize=yes" if kind == "gguf" else ""  # the float base: every GGUF tensor de-quantized
    cal = ["--calib", str(calib), "--calib-samples", str(cfg.calib_samples), "--calib-seq-len", str(cfg.calib_seq_len)]
    v = folder / "variants"
    steps = {
        "fp32": Step("fp32", "fp32", "the base model in fp32" + (" (GGUF de-quantized)" if deq else ""), None, None,
                     f"fp32={model}{deq}"),
        "bf16": Step("bf16", "bf16", "the base model in bf16", None, None, f"bf16={model},dtype=bf16{deq}"),
        "gguf": Step("gguf", "gguf-native", "the GGUF as shipped (its quantized types run natively)", None, None,
                     f"gguf-native={model}"),
        "gptq": Step("gptq", "gptq-w4g128", "GPTQ 4-bit, group 128 (min/max grid, act-order)", [
            "quantize", model, "--method", "gptq", "--bits", "4", "--group-size", "128", *cal],
            v / "gptq-w4g128", f"gptq-w4g128={v / 'gptq-w4g128'}"),
        "wanda": Step("wanda", "wanda-2:4", "Wanda pruning to 2:4 sparsity", [
            "prune", model, "--method", "wanda", "--pattern", "2:4", *cal], v / "wanda-2of4",
            f"wanda-2:4={v / 'wanda-2of4'}"),
        "lora": Step("lora", f"lora-{cfg.lora_steps}steps",
                     f"LoRA r 8, {cfg.lora_steps} steps on the built-in instruct data", [
                         "finetune", model, *(["--dequantize"] if deq else []), "--method", "lora", "--r", "8",
                         "--data", "builtin:instruct", "--max-steps", str(cfg.lora_steps), "--seq-len",
                         str(cfg.lora_seq_len), "--batch-size", "2", "--lr", "5e-4"],
                     v / "lora", ""),
    }
    steps["lora"].spec = f"{steps['lora'].label}={model}{deq},adapter={v / 'lora'}"
    ident = model_identity(model)
    out = [steps[n] for n in names]
    for s in out:
        s.key = _digest({"argv": s.argv, "spec": s.spec.split("=", 1)[0], "model": ident,
                         "calib": _digest(calib.read_text(encoding="utf-8")) if s.argv else None,
                         "slimlm": slimlm_version(), "demo": STATE_VERSION})
    return out


def bench_key(steps: list[Step], cfg: DemoConfig, threads: int | None) -> str:
    sizes = {k: getattr(cfg, k) for k in ("ppl_tokens", "seq_len", "prompt_tokens", "new_tokens", "concurrency",
                                          "repeats", "warmup")}
    return _digest({"variants": [(s.label, s.key) for s in steps], "sizes": sizes, "threads": threads,
                    "host": platform.node(), "slimlm": slimlm_version(), "demo": STATE_VERSION})


# --- the demo folder ---------------------------------------------------------------------------
def open_folder(folder: Path) -> dict[str, Any]:
    """The demo folder's state (created when absent). A non-empty folder without the demo's marker is
    refused in one line: the demo never writes into, or deletes from, a folder slimlm did not make."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
        raise SlimlmError(f"demo folder {folder} exists and is not a folder; choose another --out")
    if folder.is_dir() and any(folder.iterdir()):
        try:
            state = json.loads((folder / STATE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = None
        if not isinstance(state, dict) or state.get("written_by") != "slimlm demo":
            first = sorted(p.name for p in folder.iterdir())[0]
            raise SlimlmError(f"refusing to use {folder} for the demo: it holds {first}, and slimlm demo did not make "
                              "this folder (choose another --out)")
        if state.get("version") != STATE_VERSION:
            state = {"written_by": "slimlm demo", "version": STATE_VERSION}
        return state
    folder.mkdir(parents=True, exist_ok=True)
    state = {"written_by": "slimlm demo", "version": STATE_VERSION, "variants": {}, "bench": None}
    save_state(folder, state)
    return state


def save_state(folder: Path, state: dict[str, Any]) -> None:
    from slimlm.bench.results import write_json

    state.setdefault("variants", {})
    state.setdefault("bench", None)
    write_json(state, folder / STATE)


def is_cached(state: dict[str, Any], step: Step) -> bool:
    rec = state.get("variants", {}).get(step.name)
    return bool(rec and rec.get("key") == step.key and step.out is not None and step.out.is_dir())


# --- the best variant ------------------------------------------------------------------------------
def best_variant(run: dict[str, Any], max_increase: float) -> tuple[str, str]:
    """(label, why): the fastest batch-1 decode among the variants whose perplexity on the first corpus is
    at most ``(1 + max_increase)`` times the base's; ties go to fewer weight bytes."""
    from slimlm.report.data import points

    pts = [p for p in points([run]) if p.ok]
    base = next((p for p in pts if p.label == run["base"]), None)
    corpus = run["corpora"][0]["name"]
    if base is None or base.ppl(corpus) is None:
        if not pts:
            raise SlimlmError("every variant failed; nothing to chat with")
        return pts[0].label, "the base variant failed, so no rule applies: the first variant that ran"
    limit = float(base.ppl(corpus)) * (1 + max_increase)  # type: ignore[arg-type]
    ok = [p for p in pts if p.ppl(corpus) is not None and p.ppl(corpus) <= limit and p.speed() is not None]  # type: ignore[operator]
    if not ok:
        return base.label, "no variant had a decode rate; the base"
    best = max(ok, key=lambda p: (p.speed(), -p.variant["weight_bytes"]))
    d, bp, pp = best.speed(), base.ppl(corpus), best.ppl(corpus)
    return best.label, (f"fastest batch-1 decode ({d:.1f} tok/s) among the {len(ok)} variants whose perplexity is within "
                        f"+{100 * max_increase:.0f}% of {base.label}'s ({bp:.2f} -> limit {limit:.2f}); "
                        f"its perplexity {pp:.2f} ({100 * (pp / bp - 1):+.1f}%)")  # type: ignore[operator]
