"""``slimlm finetune MODEL --data FILE --out DIR`` and ``slimlm merge MODEL --adapter DIR --out DIR``.

``finetune`` applies a PEFT method (``--method lora|dora|ia3|prompt_tuning``) or trains every weight
(``--full``), runs the one trainer loop (``slimlm.train.loop``) and writes, atomically:
``--out DIR`` = a peft-layout adapter (``adapter_config.json`` + ``adapter_model.safetensors``, which
``peft.PeftModel.from_pretrained`` loads) or, with ``--full``, an HF model folder. Checkpoints go to
``--checkpoint-dir`` (default ``DIR.ckpt``); ``--resume`` continues one bit for bit. The method's and
the loop's options are flags generated from their configs (``slimlm.train.config``), overriding a
``--recipe`` file's values. Every input problem (data lines, target modules, rank, a checkpoint of
another model) is one ``error:`` line before anything is written.

``--distributed ddp|fsdp`` trains data-parallel over the ranks ``torchrun`` started (gloo on CPU):
``torchrun --nproc-per-node 2 -m slimlm.cli.main finetune ... --distributed ddp``; each step then
sees ``world x --batch-size x --grad-accum`` windows and only rank 0 writes (``slimlm.train.distributed``).

Example::

    slimlm finetune smollm2-135m --method lora --r 8 --data builtin:instruct --max-steps 2 --seq-len 128 \\
        --out out/smollm2-lora
    slimlm merge smollm2-135m --adapter out/smollm2-lora --out out/smollm2-merged
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from slimlm.cli.common import add_json_arg, add_model_arg, add_runtime_args, emit_json, status
from slimlm.utils.errors import SlimlmError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slimlm.train.config import AdapterArgs, TrainConfig

    p = subparsers.add_parser("finetune", help="fine-tune with LoRA/DoRA/IA3/prompt tuning (peft-format adapter) "
                              "or all weights (--full)", description=__doc__.split("\n\n")[1] if __doc__ else None)
    add_model_arg(p)
    p.add_argument("--data", help="training data: builtin:instruct, a .jsonl file ({prompt, completion} / "
                                  "{messages} / {text} per line) or a plain text file")
    p.add_argument("--eval-data", help="held-out data for eval loss/ppl (same formats)")
    p.add_argument("--out", help="output folder: the adapter (peft layout), or an HF folder with --full")
    p.add_argument("--full", action="store_true", help="train every weight; --out gets an HF model folder")
    p.add_argument("--recipe", help="YAML/JSON recipe: {kind: finetune, ...} and/or {kind: train, ...} mappings")
    p.add_argument("--resume", help="continue from a checkpoint folder (or the newest one inside it), bit for bit")
    p.add_argument("--checkpoint-dir", help="where step-N checkpoints and metrics.jsonl go (default: OUT.ckpt)")
    p.add_argument("--overwrite", action="store_true", help="replace an output slimlm wrote earlier")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_arg(p)
    add_runtime_args(p)
    AdapterArgs.add_arguments(p.add_argument_group("method options"))
    TrainConfig.add_arguments(p.add_argument_group("training options"), skip=("dtype",))
    p.add_argument("--train-dtype", dest="train_dtype", choices=["auto", "fp32", "bf16"], default=None,
                   help="compute dtype of training: bf16 autocast with fp32 master weights where the CPU has native "
                        "bf16 (auto, default), or forced")
    p.set_defaults(func=run_finetune)

    m = subparsers.add_parser("merge", help="fold a LoRA/IA3 adapter into its base model and save the model",
                              description="Load MODEL, apply the peft-layout adapter, merge it into the weights "
                                          "(a weight-only quantized base is re-quantized and the error added is reported; "
                                          "a GGUF base is de-quantized) and save a slimlm model folder (--hf: a plain HF "
                                          "folder).")
    add_model_arg(m)
    m.add_argument("--adapter", required=True, help="peft-layout adapter folder")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--hf", action="store_true", help="write a plain HF folder (dense weights)")
    m.add_argument("--overwrite", action="store_true", help="replace an output slimlm wrote earlier")
    add_json_arg(m)
    add_runtime_args(m)
    m.set_defaults(func=run_merge)


# --- configs --------------------------------------------------------------------------------------
def build_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from slimlm.train.config import AdapterArgs, TrainConfig
    from slimlm.utils.config import load_recipe

    stages: dict[str, dict[str, Any]] = {}
    if args.recipe:
        for d in load_recipe(args.recipe):
            kind = d.get("kind")
            if kind not in ("finetune", "train"):
                raise SlimlmError(f"recipe {args.recipe}: kind {kind!r} is not a fine-tuning stage (finetune, train)")
            stages[str(kind)] = d
    method = AdapterArgs.from_args(args, stages.get("finetune"))
    if args.full:
        method = AdapterArgs.from_dict({**method.to_dict(), "method": "full"})
    train = dict(stages.get("train") or {})
    if args.train_dtype is not None:
        train["dtype"] = args.train_dtype
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "dtype"})  # --dtype: the load dtype
    return method, TrainConfig.from_args(ns, train)


def _read(spec: str, lm: Any, cfg: Any, say: Any = status) -> list[Any]:
    from slimlm.train.data import DataStats, read_examples

    stats = DataStats()
    ex = read_examples(spec, lm.tokenizer, cfg.seq_len, cfg.on_bad_line, stats)
    note = f", {stats.skipped_lines} bad lines skipped" if stats.skipped_lines else ""
    note += f", {stats.truncated} cut to {cfg.seq_len} tokens" if stats.truncated else ""
    say(f"data {spec}: {stats.examples} examples, {stats.target_tokens} target tokens{note}")
    return ex


def run_finetune(args: argparse.Namespace) -> int:
    from slimlm.train.distributed import Dist

    method, cfg = build_configs(args)
    if not args.data or not args.out:
        raise SlimlmError("finetune needs --data FILE (or builtin:instruct) and --out DIR")
    dist = Dist.from_env(cfg.distributed)  # before any work: a bad launch is one line
    try:
        return _finetune(args, method, cfg, dist)
    finally:
        dist.close()


def _finetune(args: argparse.Namespace, method: Any, cfg: Any, dist: Any) -> int:
    import torch

    from slimlm.cli.common import apply_threads
    from slimlm.loaders import load_model
    from slimlm.loaders.outputs import check_output_dir
    from slimlm.train.loop import Trainer

    say = status if dist.is_main else (lambda msg: None)
    out = check_output_dir(args.out, args.overwrite)
    ckpt_dir = Path(args.checkpoint_dir or f"{out}.ckpt")
    if args.resume is None and ckpt_dir.is_dir() and any(ckpt_dir.iterdir()):
        raise SlimlmError(f"checkpoint folder {ckpt_dir} already holds a run: continue it with --resume {ckpt_dir}, "
                          "or give another --checkpoint-dir")
    apply_threads(args)
    from slimlm.cli.common import DTYPES

    # full fine-tuning trains float weights; adapters train on the base as it is (quantized: QLoRA)
    lm = load_model(args.model, dtype=DTYPES[args.dtype],
                    dequantize=True if method.method == "full" else args.dequantize)
    examples = _read(args.data, lm, cfg, say)
    evals = _read(args.eval_data, lm, cfg, say) if args.eval_data else None
    torch.manual_seed(cfg.seed)  # adapter init
    groups = None
    if method.method == "full":
        lm.model.requires_grad_(True)
        summary = f"full fine-tuning: {sum(p.numel() for p in lm.model.parameters()):,} parameters"
    else:
        from slimlm.peft import apply_peft, lora_plus_param_groups

        summary = apply_peft(lm.model, method.peft_config()).summary()
        if method.lora_plus_ratio:
            groups = lora_plus_param_groups(lm.model, cfg.lr, method.lora_plus_ratio, cfg.weight_decay)
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    trainer = Trainer(lm.model, cfg, examples, evals, checkpoint_dir=ckpt_dir, resume=args.resume,
                      param_groups=groups, progress=not (args.no_progress or args.json), pad_id=pad, dist=dist)
    if not args.json:
        say(summary)
        ranks = f" on {dist.world} ranks ({dist.mode})" if dist.active else ""
        say(f"training {cfg.max_steps} steps (from step {trainer.step}){ranks} in "
            f"{str(trainer.dtype).removeprefix('torch.')}; checkpoints in {ckpt_dir}")
    res = trainer.train()
    with dist.full_params(lm.model):  # FSDP: the full tensors (every rank gathers); rank 0 writes
        saved = _save(lm, method, out, args) if dist.is_main else out
    dist.barrier()
    if not dist.is_main:
        return 0
    result = {"out": str(saved), "method": method.method, "steps": res.steps, "final_loss": res.final_loss,
              "eval_loss": res.eval_loss, "tokens": res.tokens, "seconds": res.seconds,
              "checkpoint": str(res.checkpoint) if res.checkpoint else None,
              "metrics": str(trainer.metrics_path) if trainer.metrics_path else None}
    if args.json:
        emit_json(result)
    else:
        ev = f", eval loss {res.eval_loss:.4f}" if res.eval_loss is not None else ""
        print(f"trained {res.steps} steps, loss {res.final_loss:.4f}{ev}; saved {saved}")
    return 0


def _save(lm: Any, method: Any, out: Path, args: argparse.Namespace) -> Path:
    """The adapter in peft's layout (through slimlm.peft's saver) or, for --full, an HF folder."""
    from slimlm.loaders.outputs import atomic_dir

    if method.method == "full":
        from slimlm.loaders.save import export_hf

        lm.model.requires_grad_(False)
        return export_hf(lm, out, overwrite=args.overwrite)
    from slimlm.peft import save_adapter

    def write(tmp: Path) -> None:
        inner = save_adapter(lm.model, tmp / "adapter", base_model_name_or_path=args.model)
        for f in inner.iterdir():
            f.rename(tmp / f.name)
        inner.rmdir()
        (tmp / "training_args.json").write_text(json.dumps({"method": method.to_dict()}, indent=2) + "\n")

    return atomic_dir(out, write, kind="peft-adapter")


# --- merge ----------------------------------------------------------------------------------------
def run_merge(args: argparse.Namespace) -> int:
    from slimlm.cli.common import load
    from slimlm.loaders.outputs import check_output_dir
    from slimlm.loaders.resolve import resolve
    from slimlm.loaders.save import export_hf, save_model
    from slimlm.peft import load_adapter, merge_and_unload

    out = check_output_dir(args.out, args.overwrite)
    # GGUF block types have no re-quantizer here: such a base is de-quantized and the adapter merged in float
    gguf = resolve(args.model)[1] == "gguf"
    if gguf and not args.json:
        status("note: the GGUF base is de-quantized to float; the merged model is saved in float")
    lm = load(args, dense=args.hf or gguf)
    paths = load_adapter(lm.model, args.adapter)
    report = merge_and_unload(lm.model)
    worst = report.max_error
    saved = (export_hf(lm, out, overwrite=args.overwrite) if args.hf
             else save_model(lm, out, meta={"merged_adapter": str(args.adapter)}, overwrite=args.overwrite))
    if args.json:
        emit_json({"out": str(saved), "modules": len(paths), "max_requantization_error": worst})
    else:
        print(f"{report.summary()}; saved {saved}")
    return 0
