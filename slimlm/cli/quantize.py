"""``slimlm quantize MODEL (--recipe FILE | --method M [options]) [--calib FILE] --out DIR``.

Loads MODEL, quantizes it with :func:`slimlm.quant.quantize_` and saves a slimlm output directory
(``save_model``) that ``eval``/``generate``/``bench``/``serve`` load. Method options are flags
generated from the method configs (``--bits 3 --group-size 64 --act-order/--no-act-order``); flags
override a recipe's values. ``--dry-run`` prints the plan and a rough estimate of peak memory and
time without quantizing. Every input problem is checked before the long work starts and reported as
one line; the output folder is written to a temp path and renamed, so it is never half-written.

Example::

    slimlm quantize smollm2-135m --recipe recipes/gptq-w4g128.yaml \\
        --calib ../shared/data/wikitext-2-raw/wiki.test.raw --calib-start-char 400000 --out out/gptq

Calibrated methods require ``--calib`` (see :mod:`slimlm.cli.calib_args`).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time
from typing import Any

import torch

from slimlm.cli.calib_args import add_calib_args, calib_record, calib_samples, check_calib_args
from slimlm.cli.common import add_json_arg, add_model_arg, add_runtime_args, emit_json, human_bytes, status
from slimlm.utils.errors import ConfigError, SlimlmError


def methods() -> dict[str, Any]:
    from slimlm.quant.methods import methods as registered

    return registered()


def _config_classes() -> dict[str, Any]:
    return {k: e.config_cls for k, e in sorted(methods().items())}


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = subparsers.add_parser("quantize", help="post-training quantization (RTN, GPTQ, AWQ, SmoothQuant, LLM.int8(), NF4)",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    add_model_arg(p)
    src = p.add_argument_group("what to run")
    src.add_argument("--recipe", help="YAML/JSON recipe file (serialized quantization config)")
    src.add_argument("--method", help="method name: " + ", ".join(_config_classes()))
    calibrated = ", ".join(k for k, e in sorted(methods().items()) if e.calibrated)
    add_calib_args(p, calibrated, old_names=True)
    out = p.add_argument_group("output")
    out.add_argument("--out", help="output folder (a slimlm model directory)")
    out.add_argument("--overwrite", action="store_true", help="replace an existing model in --out")
    out.add_argument("--dry-run", action="store_true", help="print the plan and estimates, quantize nothing")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_arg(out)
    add_runtime_args(p)
    added: set[str] = set()
    for kind, cls in _config_classes().items():
        grp = p.add_argument_group(f"{kind} options")
        names = {f.name for f in dataclasses.fields(cls)}
        cls.add_arguments(grp, skip=tuple(added))  # shared fields (bits, ignore, ...) appear once
        added |= names
    _per_method_help(p)
    p.set_defaults(func=run, _option_names=sorted(added))


def _per_method_help(p: argparse.ArgumentParser) -> None:
    """A flag several methods share (``--block-size``, ``--clip-search``) gets each method's default (and
    meaning, where they differ) in --help instead of the first method's."""
    owners: dict[str, list[tuple[str, Any]]] = {}
    for kind, cls in _config_classes().items():
        for f in dataclasses.fields(cls):
            owners.setdefault(f.name, []).append((kind, f))
    def default(f: Any) -> Any:
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()

    for action in p._actions:
        fs = owners.get(action.dest, [])
        if not fs:
            continue
        if action.help and "(default: None)" in action.help and fs[0][1].default is dataclasses.MISSING:
            action.help = action.help.replace("(default: None)", f"(default: {default(fs[0][1])})")  # a factory
        if len(fs) < 2:
            continue
        helps = {f.metadata.get("help", "") for _, f in fs}
        if len(helps) > 1:  # one name, different meanings (gptq block_size vs nf4 block_size)
            action.help = "; ".join(f"{k}: {f.metadata.get('help', '')} (default {default(f)})" for k, f in fs)
        elif len({repr(default(f)) for _, f in fs}) > 1:
            action.help = f"{helps.pop()} (default: " + ", ".join(f"{k} {default(f)}" for k, f in fs) + ")"


# --- building the config ------------------------------------------------------------------------
def build_configs(args: argparse.Namespace) -> list[Any]:
    from slimlm.quant.api import config_for_method, load_quant_recipe

    given = {n for n in args._option_names if getattr(args, n, None) is not None}
    if args.recipe and args.method:
        raise SlimlmError("give either --recipe or --method, not both")
    if args.recipe:
        cfgs = load_quant_recipe(args.recipe)
        if given and len(cfgs) > 1:
            raise SlimlmError(f"recipe {args.recipe} has {len(cfgs)} stages; option flags only apply to one-stage recipes")
        if given:
            cfgs = [_with_flags(cfgs[0].kind, cfgs[0].to_dict(), args, given)]
        return cfgs
    if not args.method:
        raise SlimlmError("say what to run: --recipe FILE or --method {" + ",".join(_config_classes()) + "}")
    if args.method not in _config_classes():
        raise SlimlmError(f"unknown method {args.method!r}; known: {', '.join(_config_classes())}")
    return [_with_flags(args.method, {}, args, given)] if given else [config_for_method(args.method)]


def _with_flags(kind: str, base: dict[str, Any], args: argparse.Namespace, given: set[str]) -> Any:
    cls = _config_classes()[kind]
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    foreign = sorted(given - fields)
    if foreign:
        flag = "--" + foreign[0].replace("_", "-")
        raise ConfigError(f"{flag} does not apply to {kind}; its options: "
                          + ", ".join("--" + n.replace("_", "-") for n in sorted(fields)))
    return cls.from_args(args, base)


# --- plan and estimates ---------------------------------------------------------------------------
def _gflops(dtype: torch.dtype = torch.float32) -> float:
    """Matmul speed in ``dtype`` right now (best of 3), to turn FLOP counts into seconds."""
    a = torch.randn(1024, 1024).to(dtype)
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t)
    return 2 * 1024**3 / best / 1e9


def plan(lm: Any, cfgs: list[Any], args: argparse.Namespace, calibrated: bool) -> dict[str, Any]:
    from slimlm.calib.driver import resolve_calib_dtype
    from slimlm.quant.api import check_model
    from slimlm.quant.methods.base import layer_groups

    model, mc = lm.model, lm.config
    params = model.num_parameters()
    fp32 = params * 4
    paths = check_model(model, cfgs[0])
    bits: dict[str, int] = {}
    for p in paths:
        c = cfgs[0].for_module(p)
        key = str(getattr(c, "bits", {"nf4": 4, "smoothquant": 8, "int8-outlier": 8}.get(c.kind, "?")))
        bits[key] = bits.get(key, 0) + 1
    tokens = args.calib_samples * args.calib_seq_len if calibrated else 0
    layer0 = model.model.layers[0]
    layer_params = sum(p.numel() for p in layer0.parameters())
    ins = [layer0.get_submodule(g[0]).in_features for g in layer_groups(layer0)]
    hidden_bytes = tokens * mc.hidden_size * 4 * 2  # the layer's inputs and outputs for the whole set
    act_bytes = min(8, args.calib_samples) * args.calib_seq_len * max(mc.intermediate_size, mc.hidden_size) * 4 * 6
    state_bytes = sum(i * i * 4 for i in ins) * 3 if calibrated else 0
    peak = int(fp32 * 1.15 + hidden_bytes + act_bytes + state_bytes) if calibrated else int(fp32 * 1.3)
    passes = 2 + (len(ins) if any(getattr(c, "true_sequential", False) for c in cfgs) else 0)
    flops, fwd_flops = 0.0, 0.0
    if calibrated:
        fwd_flops = passes * 2 * layer_params * tokens * mc.num_hidden_layers  # layer forwards
        flops += 2 * sum(i * i for i in ins) * tokens * mc.num_hidden_layers  # x^T x statistics
        if any(c.kind == "awq" for c in cfgs):
            flops += 20 * 2 * layer_params * max(ins) * mc.num_hidden_layers  # scale grid via H
    shapes = [(model.get_submodule(p).out_features, model.get_submodule(p).in_features) for p in paths]
    flops += 50 * sum(o * i for o, i in shapes)  # rounding, packing
    overhead = 0.0
    if any(c.kind == "gptq" for c in cfgs):  # block updates ~ out * in^2, plus a Python step per column
        flops += 2 * sum(o * i * i for o, i in shapes)
        overhead = 3e-5 * sum(i for _, i in shapes)
    gf = _gflops()
    fwd_dtype = max((resolve_calib_dtype(c.calib_dtype) for c in cfgs if hasattr(c, "calib_dtype")),
                    key=lambda d: d == torch.float32, default=torch.float32)  # fp32 if any step runs fp32
    fwd_gf = gf if fwd_dtype == torch.float32 else _gflops(fwd_dtype)
    seconds = (flops / (gf * 1e9) + fwd_flops / (fwd_gf * 1e9)) * 1.5 + overhead
    return {
        "model": args.model, "parameters": params, "fp32_bytes": fp32,
        "configs": [c.to_dict() for c in cfgs], "steps": [c.short() for c in cfgs],
        "linears": len(paths), "linears_by_bits": bits,
        "calibration": calib_record(args) if calibrated else None,
        "estimated_peak_bytes": peak, "estimated_seconds": seconds, "measured_gflops": gf,
        "calibration_forward_dtype": str(fwd_dtype).removeprefix("torch.") if calibrated else None,
        "out": args.out,
    }


def _print_plan(pl: dict[str, Any]) -> None:
    print(f"model: {pl['model']} ({pl['parameters'] / 1e6:.1f} M parameters, fp32 {human_bytes(pl['fp32_bytes'])})")
    for s in pl["steps"]:
        print(f"step: {s}")
    print(f"linears to quantize: {pl['linears']} (by bits: {pl['linears_by_bits']})")
    if pl["calibration"]:
        c = pl["calibration"]
        print(f"calibration: {c['n_samples']} x {c['seq_len']} tokens from {c['file']} (from character {c['start_char']})")
    print(f"estimated peak memory: ~{human_bytes(pl['estimated_peak_bytes'])}; estimated time: "
          f"~{pl['estimated_seconds']:.0f} s (rough, at {pl['measured_gflops']:.0f} fp32 GFLOP/s measured now"
          + (f"; calibration forwards in {pl['calibration_forward_dtype']})" if pl.get("calibration_forward_dtype") else ")"))
    print(f"output: {pl['out']}")


# --- run ------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from slimlm.cli.common import load
    from slimlm.loaders.save import check_output_dir, save_model
    from slimlm.quant.api import needs_calibration, quantize_
    from slimlm.utils.memory import peak_rss_bytes, release_free_memory, reset_peak_rss

    cfgs = build_configs(args)
    calibrated = needs_calibration(cfgs)
    if not args.out and not args.dry_run:
        raise SlimlmError("--out DIR is required (where the quantized model goes)")
    if args.out:
        check_output_dir(args.out, args.overwrite)
    check_calib_args(args, calibrated, next((c.kind for c in cfgs if methods()[c.kind].calibrated), "quantize"))
    lm = load(args, dense=True)
    samples = calib_samples(args, lm) if calibrated else None
    pl = plan(lm, cfgs, args, calibrated)
    if args.dry_run:
        emit_json({"dry_run": True, **pl}) if args.json else _print_plan(pl)
        return 0
    if not args.json:
        status(f"quantizing {args.model}: " + "; ".join(pl["steps"]))
    lm.checkpoint.tensors = {}  # the loader's interchange copy is not needed any more
    release_free_memory()
    reset_peak_rss()
    t0 = time.perf_counter()
    rep = quantize_(lm.model, cfgs, samples, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    peak = peak_rss_bytes()
    meta = {"quantization": {"configs": [c.to_dict() for c in cfgs], "seconds": seconds,
                             "bits_per_weight_linears": rep.linear_bits_per_weight,
                             "bits_per_weight_model": rep.model_bits_per_weight,
                             "calibration": pl["calibration"]},
            "recipe": [c.to_dict() for c in cfgs]}
    out = save_model(lm, args.out, meta=meta, overwrite=args.overwrite)
    size = (out / "model.safetensors").stat().st_size
    result = {"out": str(out), "method": rep.method, "seconds": seconds,
              "bits_per_weight_linears": rep.linear_bits_per_weight, "bits_per_weight_model": rep.model_bits_per_weight,
              "size_on_disk_bytes": size, "peak_rss_bytes": peak,
              "peak_rss_process_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "by_kind": rep.by_kind(), "configs": meta["recipe"]}
    if args.json:
        emit_json(result)
    else:
        print(rep.summary())
        print(f"saved {out} ({human_bytes(size)} on disk); quantization {seconds:.1f}s, peak RSS while quantizing "
              f"{human_bytes(peak)}")
    return 0
