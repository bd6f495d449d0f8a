"""``slimlm convert-gqa``: merge key/value heads to fewer KV groups (MHA -> GQA/MQA).

Examples::

    slimlm convert-gqa smollm2-135m --kv-heads 1 --out mqa/
    slimlm convert-gqa smollm2-135m --kv-heads 1 --weighting activation --calib wiki.txt --out mqa-w/
"""

from __future__ import annotations

import argparse

from slimlm.cli.calib_args import add_calib_args
from slimlm.cli.common import add_json_arg, add_model_arg, add_runtime_args, load, status
from slimlm.cli.prune import add_output_args, check_calib, dry_run, finish, recipe_config, run_transform
from slimlm.utils.errors import SlimlmError


def run(args: argparse.Namespace) -> int:
    from slimlm.loaders.save import check_output_dir
    from slimlm.lowrank.gqa import GQAConfig

    cls, base = recipe_config(args, {"convert-gqa": GQAConfig})
    cfg = cls.from_args(args, base)
    assert isinstance(cfg, GQAConfig)
    check_output_dir(args.out, args.overwrite)
    check_calib(args, cfg, "convert-gqa --weighting activation")
    lm = load(args, dense=True)
    h = lm.config.num_attention_heads
    if h % cfg.kv_heads or cfg.kv_heads > h:
        raise SlimlmError(f"--kv-heads {cfg.kv_heads} does not divide the {h} attention heads")
    if args.dry_run:
        return dry_run(args, cfg, {"model": args.model, "kv_heads_before": lm.config.num_key_value_heads,
                                   "kv_heads_after": cfg.kv_heads, "out": args.out})
    report = run_transform(args, lm, cfg)
    status(f"KV heads {report['kv_heads_before']} -> {report['kv_heads_after']} "
           f"(KV cache x{report['kv_cache_ratio']:.3f})")
    return finish(args, lm, cfg, report, "convert-gqa")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slimlm.lowrank.gqa import GQAConfig

    p = sub.add_parser("convert-gqa", help="merge KV heads into fewer groups (MHA -> GQA/MQA); shrinks the KV cache")
    add_model_arg(p)
    p.add_argument("--recipe", default=None, help="YAML/JSON recipe with one convert-gqa stage")
    GQAConfig.add_arguments(p)
    add_calib_args(p, "--weighting activation")
    add_output_args(p)
    add_runtime_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)
