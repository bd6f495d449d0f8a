"""``slimlm factorize``: replace linears by low-rank pairs (plain or activation-aware SVD).

Examples::

    slimlm factorize smollm2-135m --ratio 0.8 --out svd80/
    slimlm factorize smollm2-135m --ratio 0.8 --activation-aware --calib wiki.txt --out asvd80/
    slimlm factorize smollm2-135m --energy 0.95 --out svd-e95/
"""

from __future__ import annotations

import argparse

from slimlm.cli.calib_args import add_calib_args
from slimlm.cli.common import add_json_arg, add_model_arg, add_runtime_args, load, status
from slimlm.cli.prune import add_output_args, check_calib, dry_run, finish, recipe_config, run_transform


def run(args: argparse.Namespace) -> int:
    from slimlm.loaders.save import check_output_dir
    from slimlm.lowrank.factorize import FactorizeConfig

    cls, base = recipe_config(args, {"factorize": FactorizeConfig})
    cfg = cls.from_args(args, base)
    assert isinstance(cfg, FactorizeConfig)
    check_output_dir(args.out, args.overwrite)
    check_calib(args, cfg, "factorize --activation-aware")
    lm = load(args, dense=True)
    if args.dry_run:
        from slimlm.transforms.select import has_module

        n = sum(1 for i, layer in enumerate(lm.model.model.layers) for p in cfg.targets
                if cfg.wants(i, p) and has_module(layer, p))
        return dry_run(args, cfg, {"model": args.model, "modules_to_factorize": n,
                                   "needs_calibration": cfg.activation_aware, "parameters": lm.model.num_parameters(),
                                   "out": args.out})
    report = run_transform(args, lm, cfg)
    ranks = [m["rank"] for m in report["modules"].values() if m["rank"] is not None]
    status(f"factorized {len(ranks)} linears (ranks {min(ranks, default=0)}..{max(ranks, default=0)}); "
           f"parameters x{report['ratio']:.3f} in {report['seconds']:.1f}s")
    return finish(args, lm, cfg, report, "factorize")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slimlm.lowrank.factorize import FactorizeConfig

    p = sub.add_parser("factorize", help="low-rank factorization W ~= U V^T (plain or activation-aware SVD)")
    add_model_arg(p)
    p.add_argument("--recipe", default=None, help="YAML/JSON recipe with one factorize stage")
    FactorizeConfig.add_arguments(p)
    add_calib_args(p, "--activation-aware")
    add_output_args(p)
    add_runtime_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)
