"""The trainer's typed, versioned configs: ``TrainConfig`` (the loop) and ``AdapterArgs`` (which PEFT
method, with which hyper-parameters). Both are recipes (``kind: train`` / ``kind: finetune``) and
the source of ``slimlm finetune``'s flags, ranges included (``slimlm.utils.config``).

Example recipe (``slimlm finetune MODEL --recipe r.yaml --data builtin:instruct --out out/a``)::

    - {kind: finetune, method: lora, r: 16, lora_alpha: 32, target_modules: all-linear}
    - {kind: train, max_steps: 200, lr: 2.0e-4, schedule: cosine, warmup_steps: 20, seq_len: 512}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from slimlm.utils.config import BaseConfig, register_config
from slimlm.utils.errors import ConfigError

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@register_config
@dataclass
class TrainConfig(BaseConfig):
    """One training run of the loop in ``slimlm.train.loop``."""

    kind: ClassVar[str] = "train"
    max_steps: int = field(default=100, metadata={"help": "optimizer steps", "min": 1})
    batch_size: int = field(default=4, metadata={"help": "windows per micro-batch", "min": 1})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step", "min": 1})
    seq_len: int = field(default=512, metadata={"help": "tokens per window (longer examples are cut)", "min": 2})
    packing: bool = field(default=True, metadata={"help": "pack several examples per window (no cross-attention)"})
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate", "gt": 0})
    weight_decay: float = field(default=0.0, metadata={"help": "decoupled weight decay", "min": 0})
    optimizer: str = field(default="adamw", metadata={"help": "optimizer name (slimlm.train.optim registry)"})
    schedule: Literal["cosine", "linear", "constant"] = field(
        default="cosine", metadata={"help": "learning-rate decay after warm-up"})
    warmup_steps: int = field(default=0, metadata={"help": "linear warm-up steps", "min": 0})
    min_lr_ratio: float = field(default=0.0, metadata={"help": "final lr as a fraction of lr", "min": 0, "max": 1})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the global grad norm (0: no clipping)",
                                                        "min": 0})
    dtype: Literal["auto", "fp32", "bf16"] = field(
        default="auto", metadata={"help": "compute dtype: bf16 autocast (fp32 master weights) where the CPU has "
                                          "native bf16 (auto), or forced"})
    frozen_bf16: bool = field(default=True, metadata={
        "help": "bf16 runs: keep frozen linear weights in bf16 while training (what autocast casts them to on "
                "every call: same losses and gradients, no per-step copies), restored bit for bit after"})
    activation_checkpointing: bool = field(default=False, metadata={"help": "recompute each decoder layer in backward"})
    grow_length: bool = field(default=False, metadata={
        "help": "GrowLength: windows of seq_len/4, then seq_len/2, then seq_len over the run's thirds"})
    eval_every: int = field(default=0, metadata={"help": "eval loss/ppl every N steps (0: only at the end)", "min": 0})
    eval_fraction: float = field(default=0.0, metadata={
        "help": "share of the examples held out for eval (0: no eval unless eval data is given)", "min": 0, "lt": 1})
    save_every: int = field(default=0, metadata={"help": "checkpoint every N steps (0: only at the end)", "min": 0})
    keep_checkpoints: int = field(default=2, metadata={"help": "complete checkpoints kept", "min": 1})
    log_every: int = field(default=1, metadata={"help": "metrics-log row every N steps", "min": 1})
    seed: int = field(default=0, metadata={"help": "seed of data order, dropout and adapter init", "min": 0})
    on_bad_line: Literal["error", "skip"] = field(
        default="error", metadata={"help": "a JSONL line that is not JSON or lacks fields: stop, or skip it"})
    distributed: Literal["none", "ddp", "fsdp"] = field(default="none", metadata={
        "help": "data parallelism over the ranks torchrun started: ddp, or fsdp (FSDP2 fully_shard); each step "
                "trains on world_size x batch_size x grad_accum windows (slimlm.train.distributed)"})

    def validate(self) -> None:
        if self.warmup_steps > self.max_steps:
            raise ConfigError(f"train: warmup_steps ({self.warmup_steps}) exceeds max_steps ({self.max_steps})")
        if self.grow_length and self.seq_len < 8:
            raise ConfigError("train: grow_length needs seq_len >= 8")
        from slimlm.train.distributed import check_combination

        check_combination(self.distributed, self.optimizer)


@register_config
@dataclass
class AdapterArgs(BaseConfig):
    """Which PEFT method ``slimlm finetune`` applies (``full``: every weight trains, no adapter)."""

    kind: ClassVar[str] = "finetune"
    method: Literal["lora", "dora", "ia3", "prompt_tuning", "full"] = field(
        default="lora", metadata={"help": "PEFT method (dora = LoRA with use_dora)"})
    r: int = field(default=8, metadata={"help": "LoRA rank", "min": 1})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA scaling numerator (scaling = alpha / r)", "gt": 0})
    lora_dropout: float = field(default=0.0, metadata={"help": "dropout on the LoRA input", "min": 0, "lt": 1})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilized scaling alpha / sqrt(r)"})
    lora_plus_ratio: float = field(default=0.0, metadata={
        "help": "LoRA+: lr of lora_B = lr * ratio (0: off)", "min": 0})
    target_modules: str = field(default="all-linear", metadata={
        "help": "comma-separated linear names (q_proj,v_proj), 'all-linear' (the seven attention/MLP "
                "projections) or a regex over the runtime path (when it holds one of ()[]*+?|\\)"})
    num_virtual_tokens: int = field(default=8, metadata={"help": "prompt tuning: virtual tokens", "min": 1})

    def targets(self) -> list[str] | str:
        t = self.target_modules.strip()
        if t == "all-linear":
            return list(ALL_LINEAR)
        if any(c in t for c in "()[]*+?|\\"):
            return t
        names = [s.strip() for s in t.split(",") if s.strip()]
        if not names:
            raise ConfigError("finetune: target_modules is empty")
        return names

    def peft_config(self) -> Any:
        """The ``slimlm.peft`` config of the method (None for full fine-tuning)."""
        from slimlm.peft import IA3Config, LoraConfig, PromptTuningConfig

        if self.method in ("lora", "dora"):
            return LoraConfig(r=self.r, lora_alpha=self.lora_alpha, target_modules=self.targets(),
                              lora_dropout=self.lora_dropout, use_rslora=self.use_rslora,
                              use_dora=self.method == "dora")
        if self.method == "ia3":
            targets = self.targets() if self.target_modules != "all-linear" else ["k_proj", "v_proj", "down_proj"]
            ff = [t for t in (targets if isinstance(targets, list) else []) if t in ("down_proj", "fc2")]
            return IA3Config(target_modules=targets, feedforward_modules=ff)
        if self.method == "prompt_tuning":
            return PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens)
        return None
