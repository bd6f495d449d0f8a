"""``slimlm distill TEACHER --student {every-other-layer,PATH} --data FILE --out DIR``: knowledge distillation.

The student is the teacher's every-other layer (DistilBERT init; ``--layers N`` keeps N evenly strided
layers) or any saved model with the teacher's tokenizer (``--student PATH``, e.g. a ``slimlm prune
--structured`` output: prune, then distil). It trains through the one trainer loop
(``slimlm.train.loop``) on ``slimlm.distill``'s objective: ``(1 - alpha) * CE + alpha * T^2 * KL``
(``--kd-loss fwd_kl|rev_kl``, ``--temperature``), plus an optional hidden-state term
(``--hidden-loss cosine|mse``). The targets are the data's tokens, the teacher's greedy continuations of
the prompts (``--sequence-kd-tokens N``: sequence-level KD) or the student's own samples, regenerated
every K steps (``--on-policy-every K``: GKD-style on-policy KD). ``--out DIR`` gets a slimlm model folder (temp + rename) that every
command loads, e.g. as a speculative-decoding draft of the teacher. ``--acceptance-prompts N``
then measures that: greedy speculative decoding of N held-out prompts with the draft before and after
distillation, reporting the acceptance rate (``slimlm.engine.spec``'s counters). Flags come from the
configs (``DistillConfig``, ``TrainConfig``) and override a ``--recipe`` file's values.

Example::

    slimlm distill smollm2-135m --student every-other-layer --layers 4 --data builtin:instruct \\
        --max-steps 2 --seq-len 64 --out out/draft --acceptance-prompts 2
"""

from __future__ import annotations

import argparse
import copy
from types import SimpleNamespace
from typing import Any

from slimlm.cli.common import add_json_arg, add_model_arg, add_runtime_args, emit_json, int_arg, status
from slimlm.utils.errors import SlimlmError


def register(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from slimlm.distill.config import DistillConfig
    from slimlm.train.config import TrainConfig

    p = subparsers.add_parser("distill", help="distil a teacher into a smaller student (every-other-layer or a "
                              "saved model); optionally report its speculative acceptance rate",
                              description=__doc__.split("\n\n")[1] if __doc__ else None)
    add_model_arg(p)
    p.add_argument("--data", help="training data: builtin:instruct, a .jsonl file ({prompt, completion} / "
                                  "{messages} / {text} per line) or a plain text file")
    p.add_argument("--eval-data", help="held-out data for eval loss/ppl and the acceptance prompts (same formats)")
    p.add_argument("--out", help="output folder: the student as a slimlm model folder")
    p.add_argument("--recipe", help="YAML/JSON recipe: {kind: distill, ...} and/or {kind: train, ...} mappings")
    p.add_argument("--acceptance-prompts", type=int_arg(min=0), default=0, metavar="N",
                   help="after training: greedy speculative decoding of N prompts (eval data, else training data) "
                        "with the student as the teacher's draft, before and after distillation (default 0: off)")
    p.add_argument("--acceptance-tokens", type=int_arg(min=1), default=32, metavar="M",
                   help="tokens generated per acceptance prompt (default 32)")
    p.add_argument("--overwrite", action="store_true", help="replace an output slimlm wrote earlier")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_arg(p)
    add_runtime_args(p)
    DistillConfig.add_arguments(p.add_argument_group("distillation options"))
    TrainConfig.add_arguments(p.add_argument_group("training options"), skip=("dtype",))
    p.add_argument("--train-dtype", dest="train_dtype", choices=["auto", "fp32", "bf16"], default=None,
                   help="compute dtype of training (auto: bf16 autocast where the CPU has native bf16)")
    p.set_defaults(func=run_distill)


def build_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    from slimlm.distill.config import DistillConfig
    from slimlm.train.config import TrainConfig
    from slimlm.utils.config import load_recipe

    stages: dict[str, dict[str, Any]] = {}
    if args.recipe:
        for d in load_recipe(args.recipe):
            kind = d.get("kind")
            if kind not in ("distill", "train"):
                raise SlimlmError(f"recipe {args.recipe}: kind {kind!r} is not a distillation stage (distill, train)")
            stages[str(kind)] = d
    train = dict(stages.get("train") or {})
    if args.train_dtype is not None:
        train["dtype"] = args.train_dtype
    ns = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "dtype"})  # --dtype: the load dtype
    return DistillConfig.from_args(args, stages.get("distill")), TrainConfig.from_args(ns, train)


def _check_student_spec(spec: str) -> None:
    from slimlm.distill.config import EVERY_OTHER
    from slimlm.loaders.resolve import resolve

    if spec == EVERY_OTHER:
        return
    try:
        resolve(spec)
    except SlimlmError as e:
        raise SlimlmError(f"--student {spec}: neither '{EVERY_OTHER}' nor a model ({e})") from None


def run_distill(args: argparse.Namespace) -> int:
    from slimlm.cli.common import DTYPES, apply_threads
    from slimlm.cli.finetune import _read
    from slimlm.distill.objective import DistillLoss
    from slimlm.distill.student import build_student
    from slimlm.loaders import load_model
    from slimlm.loaders.outputs import check_output_dir
    from slimlm.loaders.save import save_model
    from slimlm.train.loop import Trainer, resolve_dtype

    dcfg, cfg = build_configs(args)
    if not args.data or not args.out:
        raise SlimlmError("distill needs --data FILE (or builtin:instruct) and --out DIR")
    out = check_output_dir(args.out, args.overwrite)
    _check_student_spec(dcfg.student)
    apply_threads(args)
    dtype = DTYPES[args.dtype]
    teacher = load_model(args.model, dtype=dtype, dequantize=args.dequantize)
    student = build_student(args.model, dcfg, teacher, dtype=dtype)
    examples = _read(args.data, teacher, cfg)
    evals = _read(args.eval_data, teacher, cfg) if args.eval_data else None
    if dcfg.sequence_kd_tokens:
        examples = _sequence_kd(teacher, examples, dcfg.sequence_kd_tokens, args.json)
    init = copy.deepcopy(student.model) if args.acceptance_prompts else None
    tok = teacher.tokenizer
    pad = tok.pad_token_id if tok is not None and tok.pad_token_id is not None else 0
    loss = DistillLoss(teacher.model, student.model, dcfg, dtype=resolve_dtype(cfg.dtype))
    on_policy = None
    if dcfg.on_policy_every:
        on_policy = _OnPolicy(student, examples, dcfg.on_policy_every, dcfg.on_policy_tokens)
        examples = on_policy.examples(0)
    trainer = Trainer(student.model, cfg, examples, evals, progress=not (args.no_progress or args.json),
                      pad_id=pad, loss_fn=loss, callbacks=[on_policy] if on_policy is not None else None)
    sc = student.model.config
    if not args.json:
        status(f"student: {sc.num_hidden_layers} layers, hidden {sc.hidden_size}, "
               f"{student.model.num_parameters():,} parameters (teacher: {teacher.model.config.num_hidden_layers} "
               f"layers, {teacher.model.num_parameters():,}); {dcfg.kd_loss} T={dcfg.temperature:g} "
               f"alpha={dcfg.alpha:g} hidden={dcfg.hidden_loss}")
        status(f"training {cfg.max_steps} steps in {str(trainer.dtype).removeprefix('torch.')}")
    res = trainer.train()
    loss.close()
    if on_policy is not None and not args.json:
        status(f"on-policy KD: the student's samples regenerated {on_policy.refreshes} times")
    student.model.requires_grad_(False)
    student.model.eval()
    meta = {"distilled_from": args.model, "distill": dcfg.to_dict(), "train": cfg.to_dict(),
            **({"student_layers_from_teacher": student.meta["student_layers_from_teacher"]}
               if "student_layers_from_teacher" in student.meta else {})}
    saved = save_model(student, out, meta=meta, overwrite=args.overwrite)
    result: dict[str, Any] = {"out": str(saved), "layers": sc.num_hidden_layers, "steps": res.steps,
                              "final_loss": res.final_loss, "eval_loss": res.eval_loss, "tokens": res.tokens,
                              "seconds": res.seconds,
                              "on_policy_refreshes": on_policy.refreshes if on_policy is not None else 0}
    if args.acceptance_prompts:
        from slimlm.cli.spec_report import acceptance_rates

        prompts = _prompts(evals or examples, args.acceptance_prompts)
        before = SimpleNamespace(model=init, tokenizer=student.tokenizer)  # the student as it started
        result["acceptance"] = acceptance_rates(teacher, {"before": before, "after": load_model(str(saved))},
                                                prompts, args.acceptance_tokens)
    if args.json:
        emit_json(result)
    else:
        ev = f", eval loss {res.eval_loss:.4f}" if res.eval_loss is not None else ""
        print(f"distilled {res.steps} steps, loss {res.final_loss:.4f}{ev}; saved {saved}")
        for name, r in (result.get("acceptance") or {}).items():
            print(f"speculative acceptance {name} distillation: {r['acceptance_rate']:.3f} "
                  f"({r['accepted']}/{r['proposed']} drafts, {r['tokens_per_step']:.2f} tokens per verify step)")
    return 0


def _prompts(examples: list[Any], n: int, max_len: int = 64) -> list[list[int]]:
    """Prompt ids of the first ``n`` examples: the masked prompt part, else the first half (at most max_len)."""
    from slimlm.distill.sequence import prompt_of

    return [prompt_of(e, max_len) for e in examples[:n]]


def _continued(lm: Any, examples: list[Any], new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[Any]:
    """The examples' prompts continued by ``lm`` through the engine (greedy, or sampled at ``temperature``)."""
    from slimlm.cli.spec_report import sized_config
    from slimlm.distill.sequence import teacher_examples
    from slimlm.engine.llm import LLM
    from slimlm.engine.sampling import SamplingConfig

    params = SamplingConfig(max_new_tokens=new_tokens, temperature=temperature, seed=seed)

    def generate(prompts: list[list[int]]) -> list[list[int]]:
        llm = LLM(lm, sized_config(prompts, new_tokens))
        return [o.token_ids for o in llm.generate(prompts, params)]

    return teacher_examples(examples, generate)


def _sequence_kd(teacher: Any, examples: list[Any], new_tokens: int, quiet: bool) -> list[Any]:
    """Sequence-level KD: the examples' prompts continued by the teacher's greedy decoding (the engine's)."""
    out = _continued(teacher, examples, new_tokens)
    if not quiet:
        status(f"sequence-level KD: {len(out)} teacher continuations of up to {new_tokens} tokens")
    return out


class _OnPolicy:
    """GKD-style on-policy targets: before step 0 and every ``every`` steps the trainer's examples become
    the prompts continued by the student's own samples (temperature 1, seeded by the step). The engine
    runs a copy of the student: tensors it creates under inference mode (rotary tables) must not enter
    the training graph."""

    def __init__(self, student: Any, prompts: list[Any], every: int, new_tokens: int) -> None:
        self.student, self.prompts, self.every, self.new_tokens = student, prompts, every, new_tokens
        self.refreshes = 0

    def examples(self, step: int) -> list[Any]:
        snapshot = SimpleNamespace(model=copy.deepcopy(self.student.model), tokenizer=self.student.tokenizer)
        self.refreshes += 1
        return _continued(snapshot, self.prompts, self.new_tokens, temperature=1.0, seed=step)

    def __call__(self, trainer: Any, row: dict[str, Any]) -> None:
        if trainer.step % self.every == 0 and trainer.step < trainer.cfg.max_steps:
            trainer.set_examples(self.examples(trainer.step))
