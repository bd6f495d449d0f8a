"""The one trainer loop: causal-LM loss on packed windows, accumulation, clipping, schedules, eval,
checkpoints and bit-exact resume. Fine-tuning (any ``slimlm.peft`` method, or every weight), distillation
(``slimlm.distill``: its objective is the ``loss_fn`` hook, its on-policy targets come in through
``set_examples``) and the training recipes drive this loop; nothing else writes one.

One optimizer step::

    micro-batches = grad_accum x (batch_size windows)          # data position advances
    n = target tokens of the whole step                        # loss = sum CE / n: every token weighs the same
    for each micro-batch: forward (bf16 autocast where native) -> (sum CE / n).backward()   # or sum loss_fn / n
    clip the global grad norm -> optimizer.step() -> scheduler.step() -> zero_grad(set_to_none=True)
    every eval_every: eval loss / ppl; every save_every: an atomic checkpoint; metrics -> JSONL

Under ``torchrun`` with ``cfg.distributed`` = ddp / fsdp the same loop runs on every rank, through the
hooks of ``slimlm.train.distributed.Dist`` (the rank's slice of each global micro-batch, the global
token count for ``n``, gradient sync on the last micro-batch, all-reduced metrics, rank 0 writes).

Run it through ``slimlm finetune`` or directly::

    from slimlm.train import TrainConfig, Trainer, read_examples
    ex = read_examples("builtin:instruct", lm.tokenizer, seq_len=256)
    result = Trainer(lm.model, TrainConfig(max_steps=20, seq_len=256), ex, checkpoint_dir="out/ckpt").train()
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.train.checkpoint import find_checkpoint, load_checkpoint, rng_state, save_checkpoint, step_dir
from slimlm.train.config import TrainConfig
from slimlm.train.data import IGNORE, Example, Window, WindowSampler, collate, pack, target_tokens
from slimlm.train.distributed import Dist
from slimlm.train.frozen import FrozenCast
from slimlm.train.optim import build_optimizer
from slimlm.train.schedule import length_stages, lr_factor, window_len
from slimlm.utils.cpu import has_native_bf16
from slimlm.utils.errors import SlimlmError
from slimlm.utils.memory import current_rss_bytes

Callback = Callable[["Trainer", dict[str, Any]], None]
# the training objective of one micro-batch: (model, batch, logits [B, T, V]) -> the loss *summed* over the
# batch's counted targets (the loop divides by the step's target tokens); default: ``loss_sum``
LossFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor], torch.Tensor]


def resolve_dtype(name: str) -> torch.dtype:
    """``auto``: bf16 autocast where the CPU multiplies bf16 natively, fp32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if has_native_bf16() else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


def _run(model: nn.Module, batch: dict[str, torch.Tensor], **kw: Any) -> torch.Tensor:
    """The model on a collated batch: packed windows with restarting positions and a block-diagonal
    mask, or single-example windows with a right-padding mask; ``kw`` goes to the model (``labels``)."""
    if bool(batch["packed"]):
        return model(batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"], **kw)  # type: ignore[no-any-return]
    mask = batch["attention_mask"]
    return model(batch["input_ids"], attention_mask=None if bool(mask.all()) else mask, **kw)  # type: ignore[no-any-return]


def forward_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``[B, T, V]`` of a collated batch (see :func:`_run`); prompt tuning's virtual tokens,
    which need the model's own positions, are sliced off."""
    logits = _run(model, batch)
    return logits[:, logits.shape[1] - batch["input_ids"].shape[1]:]


def forward_loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed next-token loss of a collated batch (the default objective): the model computes it
    from its hidden states in chunks (``Transformer.lm_loss_sum``), never holding ``[B, T, V]`` logits;
    same value as ``loss_sum(forward_logits(...), labels)``."""
    return _run(model, batch, labels=batch["labels"])


def loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy over the counted targets: logits [B, T, V], labels [B, T]."""
    v = logits.shape[-1]
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, v), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE, reduction="sum")


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    eval_loss: float | None
    tokens: int
    seconds: float
    checkpoint: Path | None
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Trains the parameters of ``model`` that require grad on ``examples`` (see module docstring).

    Args:
        model: a slimlm runtime model (adapters applied, or everything trainable for full fine-tuning).
        cfg: the loop's config.
        examples: tokenized training examples (``slimlm.train.data.read_examples``).
        eval_examples: held-out examples for eval loss / ppl (default: ``cfg.eval_fraction`` of ``examples``).
        checkpoint_dir: where ``step-N`` checkpoints go (None: no checkpoints).
        resume: a checkpoint (or a folder of them: the newest) to continue from, bit for bit.
        param_groups: optimizer parameter groups (e.g. LoRA+); default: every trainable tensor.
        metrics_path: JSONL metrics log (default ``checkpoint_dir/metrics.jsonl``).
        callbacks: ``f(trainer, row)`` after every optimizer step (tests use it to interrupt).
        dist: this process's place in a distributed run (default: from ``cfg.distributed`` and the
            torchrun environment); the model is wrapped (DDP) or sharded in place (FSDP2) here.
        loss_fn: the training objective (:data:`LossFn`; e.g. distillation's, ``slimlm.distill``); default:
            next-token cross-entropy. An ``nn.Module`` objective's trainable parameters (a learned projection)
            are optimized too (they are not in checkpoints). Eval loss / ppl are always plain cross-entropy.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, examples: list[Example],
                 eval_examples: list[Example] | None = None, checkpoint_dir: str | Path | None = None,
                 resume: str | Path | None = None, param_groups: list[dict[str, Any]] | None = None,
                 metrics_path: str | Path | None = None, callbacks: list[Callback] | None = None,
                 progress: bool = True, pad_id: int = 0, dist: Dist | None = None,
                 loss_fn: LossFn | None = None) -> None:
        self.model, self.cfg, self.loss_fn = model, cfg, loss_fn
        if cfg.activation_checkpointing and hasattr(model, "gradient_checkpointing"):
            model.gradient_checkpointing = True  # type: ignore[assignment]  # the one place the config is applied
        if not any(p.requires_grad for p in model.parameters()):
            raise SlimlmError("nothing to train: no parameter requires grad (apply a PEFT method or use full fine-tuning)")
        self.dist = dist if dist is not None else Dist.from_env(cfg.distributed)
        self.dtype = resolve_dtype(cfg.dtype)
        # bf16 runs: frozen fp32 linears stored as the bf16 copy autocast makes of them on every call
        # (slimlm.train.frozen; train() ends with restore_frozen, back to the original bits)
        self.frozen = (FrozenCast.apply(model, self.dtype) if cfg.frozen_bf16 and self.dist.mode != "fsdp"
                       else FrozenCast())
        names = {id(p): n for n, p in model.named_parameters()}
        self.net = self.dist.wrap(model)  # forward/backward go through it; FSDP2 replaced model's parameters
        now = dict(model.named_parameters())
        params = [p for p in model.parameters() if p.requires_grad]
        if isinstance(loss_fn, nn.Module):  # a learned projection of the objective trains too
            extra = [p for p in loss_fn.parameters() if p.requires_grad]
            if extra and self.dist.active:
                raise SlimlmError("an objective with trainable parameters (distillation's hidden-state projection) "
                                  "is not synchronised across ranks: run it in one process")
            params += extra
        if param_groups is not None:  # the same groups, over the (possibly sharded) parameters
            param_groups = [{**g, "params": [now[names[id(p)]] for p in g["params"]]} for g in param_groups]
        if eval_examples is None and cfg.eval_fraction > 0:
            n_eval = max(1, int(len(examples) * cfg.eval_fraction))
            if n_eval >= len(examples):
                raise SlimlmError(f"eval_fraction {cfg.eval_fraction} leaves no training example of {len(examples)}")
            examples, eval_examples = examples[:-n_eval], examples[-n_eval:]
        self.pad_id = pad_id
        self.packing = cfg.packing and "prompt_encoder" not in model._modules  # virtual tokens need own positions
        # every rank draws the same global micro-batch (world x batch_size windows) and trains on its slice
        self.samplers = {n: WindowSampler(pack(_cut(examples, n), n, self.packing), cfg.batch_size * self.dist.world,
                                          cfg.seed)
                         for n in length_stages(cfg)}
        self.eval_windows = (pack(_cut(eval_examples, cfg.seq_len), cfg.seq_len, self.packing)
                             if eval_examples else [])
        self.optimizer = build_optimizer(cfg.optimizer, param_groups or params, lr=cfg.lr,
                                         weight_decay=cfg.weight_decay)
        self.fused_update = bool(getattr(self.optimizer, "updates_in_backward", False))
        if self.dist.active and self.fused_update:
            from slimlm.train.distributed import check_combination

            check_combination(self.dist.mode, cfg.optimizer, fused_update=True)
        if self.fused_update:
            self.optimizer.attach(model)  # type: ignore[attr-defined]
        # a plain function: LambdaLR's state dict then holds only counters (weights_only loads it)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        mp = metrics_path or (self.checkpoint_dir / "metrics.jsonl" if self.checkpoint_dir else None)
        self.metrics_path = Path(mp) if mp is not None else None
        self.callbacks = list(callbacks or [])
        self.progress = progress and self.dist.is_main
        self.step, self.tokens = 0, 0
        self.last_checkpoint: Path | None = None
        self._saved_step = -1
        torch.manual_seed(cfg.seed + self.dist.rank)  # dropout; a resumed run restores the state it stopped with
        if resume is not None:
            ckpt = find_checkpoint(resume)
            with self.dist.full_params(model, writeback=True):
                meta = load_checkpoint(ckpt, model, self.optimizer, self.scheduler, self.dist.rank, self.dist.world)
            self.dist.shard_optimizer_state(self.optimizer)
            self.step, self.tokens = int(meta["step"]), int(meta["tokens"])
            for n, s in meta["data"].items():
                if int(n) not in self.samplers:
                    raise SlimlmError(f"--resume {ckpt}: it was taken with other window lengths (seq_len/grow_length)")
                self.samplers[int(n)].load_state_dict(s)
            self.last_checkpoint, self._saved_step = ckpt, self.step

    def set_examples(self, examples: list[Example]) -> None:
        """Train on ``examples`` from the next step on, in a fresh order seeded by the step (on-policy
        distillation regenerates its examples from the student as it trains; a resumed run starts
        from the examples it is given)."""
        self.samplers = {n: WindowSampler(pack(_cut(examples, n), n, self.packing),
                                          self.cfg.batch_size * self.dist.world, self.cfg.seed + self.step)
                         for n in length_stages(self.cfg)}

    # --- one step ------------------------------------------------------------------------------
    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        sampler = self.samplers[window_len(self.step, self.cfg)]
        lo = self.dist.rank * self.cfg.batch_size  # this rank's slice of the global micro-batch
        return [collate(sampler.next_batch()[lo:lo + self.cfg.batch_size], self.pad_id)
                for _ in range(self.cfg.grad_accum)]

    def train_step(self) -> dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics row."""
        self.model.train()
        batches = self._micro_batches()
        d = self.dist
        n = int(d.sum(sum(target_tokens(b) for b in batches))[0])  # the whole step's, over every rank
        total = 0.0
        for i, b in enumerate(batches):
            with d.no_sync(self.net, last=i == len(batches) - 1):
                with autocast(self.dtype):
                    out = forward_loss_sum(self.net, b) if self.loss_fn is None else forward_logits(self.net, b)
                summed = out if self.loss_fn is None else self.loss_fn(self.net, b, out)  # out: logits
                loss = summed / max(n, 1)
                (loss * d.world if d.active else loss).backward()  # DDP / FSDP average over ranks: undo it
            total += float(loss.detach())
        grad_norm = None
        if not self.fused_update:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            if self.cfg.max_grad_norm > 0:
                grad_norm = (d.clip_grad_norm(params, self.cfg.max_grad_norm) if d.active else
                             float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)))
        self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        if not self.fused_update:
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        total, tokens = d.sum(total, sum(int(b["attention_mask"].sum()) for b in batches))
        self.tokens += int(tokens)
        return {"step": self.step, "loss": total, "lr": lr, "grad_norm": grad_norm, "target_tokens": n,
                "window": batches[0]["input_ids"].shape[1]}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float] | None:
        """Mean next-token loss and perplexity over the held-out windows (None without any)."""
        if not self.eval_windows:
            return None
        self.model.eval()
        tot, n = 0.0, 0
        for i in range(0, len(self.eval_windows), self.cfg.batch_size):
            b = collate(self.eval_windows[i:i + self.cfg.batch_size], self.pad_id)
            with autocast(self.dtype):
                tot += float(forward_loss_sum(self.model, b))
            n += target_tokens(b)
        loss = tot / max(n, 1)
        return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}

    def save(self) -> Path:
        """An atomic checkpoint; distributed: every rank gathers, rank 0 writes, the others wait."""
        assert self.checkpoint_dir is not None
        state = {"step": self.step, "tokens": self.tokens, "config": self.cfg.to_dict(),
                 "data": {str(n): s.state_dict() for n, s in self.samplers.items()}}
        d = self.dist
        with d.full_params(self.model):
            opt = d.full_optimizer_state(self.optimizer) if d.active else None
            rngs = d.gather(rng_state()) if d.active else None
            if d.is_main:
                save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, self.scheduler, state,
                                keep=self.cfg.keep_checkpoints, optimizer_state=opt, rank_rng=rngs)
        d.barrier()
        self.last_checkpoint = step_dir(self.checkpoint_dir, self.step)
        self._saved_step = self.step
        return self.last_checkpoint

    # --- the run -------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run until ``max_steps`` (a KeyboardInterrupt propagates; the last complete checkpoint stays)."""
        t0, tok0 = time.perf_counter(), self.tokens
        bar = _bar(self.cfg.max_steps, self.step, self.progress)
        try:
            ev, last, history = self._run(bar, t0, tok0)
        finally:
            self.restore_frozen()  # also on Ctrl-C: the model is left as it came
            if bar is not None:
                bar.close()
        return TrainResult(self.step, float(last["loss"]), ev["eval_loss"] if ev else None, self.tokens - tok0,
                           time.perf_counter() - t0, self.last_checkpoint, history)

    def restore_frozen(self) -> None:
        """The frozen weights a bf16 run stored in bf16 back to their fp32 bits (``train`` ends with it;
        call it after driving ``train_step`` yourself if the model is used in fp32 afterwards)."""
        self.frozen.restore()

    def _run(self, bar: Any, t0: float, tok0: int
             ) -> tuple[dict[str, float] | None, dict[str, Any], list[dict[str, Any]]]:
        """The steps, evals and checkpoints of :meth:`train`: (final eval, last row, every row)."""
        cfg = self.cfg
        history: list[dict[str, Any]] = []
        last: dict[str, Any] = {"loss": float("nan")}
        ev: dict[str, float] | None = None
        with self._log() as log:
            while self.step < cfg.max_steps:
                row = self.train_step()
                dt = time.perf_counter() - t0
                row.update(tokens=self.tokens, tokens_per_s=(self.tokens - tok0) / max(dt, 1e-9),
                           rss_mb=current_rss_bytes() / 2**20)
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    ev = self.evaluate()
                    row.update(ev or {})
                if self.checkpoint_dir is not None and cfg.save_every and self.step % cfg.save_every == 0:
                    row["checkpoint"] = str(self.save())
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    log(row)
                history.append(row)
                last = row
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                    rss=f"{row['rss_mb']:.0f}MB")
                for cb in self.callbacks:
                    cb(self, row)
            ev = self.evaluate() if self.eval_windows else None
            if ev is not None:
                log({"step": self.step, **ev})
            if self.checkpoint_dir is not None and self._saved_step != self.step:
                self.save()
        return ev, last, history

    @contextlib.contextmanager
    def _log(self) -> Iterator[Callable[[dict[str, Any]], None]]:
        if self.metrics_path is None or not self.dist.is_main:
            yield lambda row: None
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as f:
            def write(row: dict[str, Any]) -> None:
                f.write(json.dumps(row, default=str) + "\n")
                f.flush()

            yield write


def _cut(examples: list[Example] | None, n: int) -> list[Example]:
    out = []
    for e in examples or []:
        e = Example(e.ids[:n], e.labels[:n])
        if any(t != IGNORE for t in e.labels[1:]):
            out.append(e)
    if examples and not out:
        raise SlimlmError(f"no example keeps a target token within {n}-token windows (prompts too long?)")
    return out


def _bar(total: int, start: int, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="train", unit="step", file=sys.stderr, dynamic_ncols=True)


__all__ = ["LossFn", "TrainResult", "Trainer", "Window", "forward_logits", "forward_loss_sum", "loss_sum", "resolve_dtype"]
