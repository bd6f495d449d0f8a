"""``slimlm prune``: unstructured / N:M pruning, or ``--structured`` pruning to a smaller dense model.

Examples::

    slimlm prune smollm2-135m --method sparsegpt --sparsity 0.5 --calib wiki.txt --out pruned/
    slimlm prune smollm2-135m --method wanda --pattern 2:4 --calib wiki.txt --out p24/
    slimlm prune smollm2-135m --method sparsegpt --sparsity 0.5 --bits 4 --calib wiki.txt --out p50w4/
    slimlm prune smollm2-135m --structured --target-ratio 0.75 --calib wiki.txt --out small/
    slimlm prune smollm2-135m --recipe recipes/prune-sparsegpt-50.yaml --calib wiki.txt --out pruned/

Every output is a slimlm model folder (``save_model``) that all commands load. Calibrated runs
(wanda, sparsegpt, --structured) require ``--calib`` (:mod:`slimlm.cli.calib_args`); the output
helpers here are shared by ``factorize`` and ``convert-gqa``.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from slimlm.cli.calib_args import add_calib_args, calib_samples, check_calib_args
from slimlm.cli.common import add_json_arg, add_model_arg, add_runtime_args, emit_json, load, status
from slimlm.transforms.report import TransformReport
from slimlm.utils.config import BaseConfig, load_recipe
from slimlm.utils.errors import ConfigError


# --- shared by prune / factorize / convert-gqa ----------------------------------------------------
def add_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="output folder (a slimlm model every command loads)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan; write nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def recipe_config(args: argparse.Namespace, kinds: dict[str, type[BaseConfig]]) -> tuple[type[BaseConfig], dict[str, Any]]:
    """The (config class, base dict) from ``--recipe``: exactly one stage of the given kinds."""
    if not getattr(args, "recipe", None):
        return next(iter(kinds.values())), {}
    stages = load_recipe(args.recipe)
    mine = [s for s in stages if s.get("kind") in kinds]
    others = sorted({str(s.get("kind")) for s in stages if s.get("kind") not in kinds})
    if others:
        raise ConfigError(f"recipe {args.recipe} has stage kind(s) {', '.join(others)} that this command does not run "
                          f"(expected one of {', '.join(kinds)})")
    if len(mine) != 1:
        raise ConfigError(f"recipe {args.recipe} must hold exactly one stage of kind {' or '.join(kinds)}")
    return kinds[str(mine[0]["kind"])], mine[0]


def check_calib(args: argparse.Namespace, cfg: BaseConfig, what: str) -> None:
    """The one calibration rule, from the transform registry: does this config calibrate?"""
    from slimlm.transforms import get_transform

    check_calib_args(args, get_transform(cfg).needs_calibration(cfg), what)


def run_transform(args: argparse.Namespace, lm: Any, cfg: BaseConfig) -> TransformReport:
    """Calibration samples when the config needs them, then the transform's registered entry point."""
    from slimlm.transforms import get_transform

    entry = get_transform(cfg)
    samples = calib_samples(args, lm) if entry.needs_calibration(cfg) else None
    return entry.apply(lm.model, cfg, samples, not args.no_progress)


def finish(args: argparse.Namespace, lm: Any, cfg: BaseConfig, report: TransformReport, command: str) -> int:
    """Save (atomically) and print the summary; shared by the three commands."""
    from slimlm.loaders.save import save_model

    t = time.perf_counter()
    summary = {k: v for k, v in report.to_dict().items() if k not in ("modules", "block_influence")}
    save_model(lm, args.out, meta={"recipe": [cfg.to_dict()], "command": command, "report": summary},
               overwrite=args.overwrite)
    out = {"out": args.out, "config": cfg.to_dict(), "parameters": lm.model.num_parameters(), **summary,
           "save_seconds": time.perf_counter() - t}
    if args.json:
        emit_json(out)
    else:
        status(f"saved {command} result to {args.out} ({out['parameters']:,} parameters)")
    return 0


def dry_run(args: argparse.Namespace, cfg: BaseConfig, plan: dict[str, Any]) -> int:
    out = {"dry_run": True, "config": cfg.to_dict(), **plan}
    if args.json:
        emit_json(out)
    else:
        print(cfg.to_json())
        for k, v in plan.items():
            print(f"{k}: {v}")
    return 0


# --- prune --------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from slimlm.loaders.save import check_output_dir
    from slimlm.sparsity.config import PruneConfig
    from slimlm.sparsity.structured import StructuredPruneConfig

    kinds: dict[str, type[BaseConfig]] = {"prune": PruneConfig, "prune-structured": StructuredPruneConfig}
    if args.structured:
        kinds = {"prune-structured": StructuredPruneConfig}
    elif not args.recipe:
        kinds = {"prune": PruneConfig}
    cls, base = recipe_config(args, kinds)
    cfg = cls.from_args(args, base)
    check_output_dir(args.out, args.overwrite)
    structured = isinstance(cfg, StructuredPruneConfig)
    check_calib(args, cfg, "prune --structured" if structured else f"prune --method {getattr(cfg, 'method', '')}")
    lm = load(args, dense=True)
    if isinstance(cfg, StructuredPruneConfig):
        return _structured(args, lm, cfg)
    assert isinstance(cfg, PruneConfig)
    if args.dry_run:
        layers = list(lm.model.model.layers)
        n = sum(1 for i, _ in enumerate(layers) for p in cfg.targets if cfg.sparsity_for(i, len(layers), p) is not None)
        return dry_run(args, cfg, {"model": args.model, "modules_to_prune": n,
                                   "needs_calibration": cfg.method != "magnitude", "out": args.out})
    report = run_transform(args, lm, cfg)
    status(f"{cfg.method}: mean sparsity {report['mean_sparsity']:.4f} over {len(report['modules'])} linears "
           f"in {report['seconds']:.1f}s")
    return finish(args, lm, cfg, report, "prune")


def _structured(args: argparse.Namespace, lm: Any, cfg: Any) -> int:
    from slimlm.sparsity.structured import plan_counts

    n_rm, groups, inter = plan_counts(lm.model, cfg)
    if args.dry_run:
        return dry_run(args, cfg, {"model": args.model, "remove_layers": n_rm, "kv_groups": groups,
                                   "intermediate_size": inter, "parameters": lm.model.num_parameters(), "out": args.out})
    report = run_transform(args, lm, cfg)
    status(f"structured: removed layers {report['plan']['remove_layers']}, kept {groups} KV groups and "
           f"{inter} MLP channels per layer; parameters x{report['ratio']:.3f}")
    return finish(args, lm, cfg, report, "prune --structured")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slimlm.sparsity.config import PruneConfig
    from slimlm.sparsity.structured import StructuredPruneConfig

    p = sub.add_parser("prune", help="prune weights: magnitude/wanda/sparsegpt (unstructured, N:M) or --structured")
    add_model_arg(p)
    p.add_argument("--recipe", default=None, help="YAML/JSON recipe with one prune or prune-structured stage")
    p.add_argument("--structured", action="store_true",
                   help="remove KV-head groups, MLP channels and layers (a smaller dense model)")
    PruneConfig.add_arguments(p)
    g = p.add_argument_group("structured pruning (with --structured)")
    StructuredPruneConfig.add_arguments(g)  # type: ignore[arg-type]
    add_calib_args(p, "wanda, sparsegpt, --structured")
    add_output_args(p)
    add_runtime_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)
