"""``DistillConfig``: the typed, versioned config of a distillation run (recipe ``kind: distill``).

It says how the student is made (``student``, ``layers``) and what it learns from the teacher
(``kd_loss``, ``temperature``, ``alpha``, ``hidden_loss``, ``hidden_weight``); the loop's own options
(steps, lr, seq_len, ...) stay in ``TrainConfig`` (``kind: train``). ``slimlm distill``'s flags are
generated from both. The objective per counted target token (``slimlm.distill.losses``)::

    loss = (1 - alpha) * CE(student, label) + alpha * T^2 * KL_T + hidden_weight * H

``KL_T``: forward KL(teacher || student) or reverse KL(student || teacher) of the temperature-``T``
softmaxes; ``H``: cosine distance (1 - cos) or mean squared error between the student's last hidden
state (through a learned linear projection when the widths differ) and the teacher's. ``alpha=0`` and
``hidden_weight=0`` is plain teacher-free training. DistilBERT's triple loss is
``alpha=0.5, hidden_loss=cosine, hidden_weight=1``. ``sequence_kd_tokens=N`` is sequence-level
(black-box) KD (Kim & Rush): the targets become the teacher's greedy continuations of the prompts
(``slimlm.distill.sequence``), which the objective above then fits. ``on_policy_every=K`` is GKD-style
on-policy KD (Agarwal et al., lambda = 1): every K steps the targets are regenerated as the student's
own samples, so the KD term (best with ``alpha=1``) corrects what the student actually produces.

Example recipe (``slimlm distill TEACHER --recipe r.yaml --data FILE --out DIR``)::

    - {kind: distill, student: every-other-layer, layers: 4, kd_loss: fwd_kl, temperature: 2.0, alpha: 0.9}
    - {kind: train, max_steps: 2000, lr: 1.0e-3, seq_len: 512, warmup_steps: 100}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from slimlm.utils.config import BaseConfig, register_config
from slimlm.utils.errors import ConfigError

EVERY_OTHER = "every-other-layer"


@register_config
@dataclass
class DistillConfig(BaseConfig):
    """How a student is made and what it learns from the teacher (see module docstring)."""

    kind: ClassVar[str] = "distill"
    student: str = field(default=EVERY_OTHER, metadata={
        "help": "'every-other-layer' (DistilBERT: the teacher's layers 0, 2, 4, ...; --layers picks how many, "
                "evenly strided) or a saved model (e.g. a `slimlm prune --structured` output) as the student"})
    layers: int = field(default=0, metadata={
        "help": "student depth for every-other-layer (0: half the teacher's layers)", "min": 0})
    kd_loss: Literal["fwd_kl", "rev_kl"] = field(default="fwd_kl", metadata={
        "help": "logit distillation: forward KL(teacher||student) or reverse KL(student||teacher)"})
    temperature: float = field(default=2.0, metadata={
        "help": "softmax temperature of both models in the KD term (scaled by T^2)", "gt": 0})
    alpha: float = field(default=0.5, metadata={
        "help": "weight of the KD term; the hard-label cross-entropy gets 1 - alpha (0: no teacher logits)",
        "min": 0, "max": 1})
    hidden_loss: Literal["none", "cosine", "mse"] = field(default="none", metadata={
        "help": "align the student's last hidden state with the teacher's (learned projection when widths differ)"})
    hidden_weight: float = field(default=1.0, metadata={
        "help": "weight of the hidden-state term (with --hidden-loss cosine|mse)", "min": 0})
    sequence_kd_tokens: int = field(default=0, metadata={
        "help": "sequence-level KD: train on the teacher's greedy continuation (this many tokens) of each "
                "example's prompt instead of the data's own targets (0: off)", "min": 0})
    on_policy_every: int = field(default=0, metadata={
        "help": "GKD-style on-policy KD: every N steps the examples become the prompts continued by the student's "
                "own samples (temperature 1), scored by the teacher through the KD term (0: off)", "min": 0})
    on_policy_tokens: int = field(default=32, metadata={
        "help": "tokens the student samples per prompt for on-policy KD", "min": 1})

    def validate(self) -> None:
        if not self.student.strip():
            raise ConfigError("distill: 'student' is empty (every-other-layer or a saved model)")
        if self.on_policy_every and self.sequence_kd_tokens:
            raise ConfigError("distill: on_policy_every (student samples) and sequence_kd_tokens (teacher outputs) "
                              "are two kinds of targets; choose one")

    @property
    def uses_hidden(self) -> bool:
        return self.hidden_loss != "none" and self.hidden_weight > 0


__all__ = ["EVERY_OTHER", "DistillConfig"]
