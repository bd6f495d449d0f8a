"""Student models: the teacher's every-other layer (DistilBERT), or any saved model.

``every-other-layer`` keeps ``n`` of the teacher's ``L`` decoder layers, evenly strided from the first
(``[i * L // n for i in range(n)]``: ``n = L / 2`` gives layers 0, 2, 4, ...), with the embeddings,
final norm and head, so the student starts as a shallower copy of the teacher. Any other ``student``
is a model spec (a structured-pruned output of ``slimlm prune --structured``: the Sheared-LLaMA route
of prune, then continue training; or any folder ``load_model`` reads), loaded in float so it trains.
A student must share the teacher's vocabulary and tokenizer (the KD term compares distributions over
the same token ids).

Example::

    teacher = load_model("smollm2-135m")
    student = build_student("smollm2-135m", DistillConfig(layers=4), teacher)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.distill.config import EVERY_OTHER, DistillConfig
from slimlm.utils.errors import SlimlmError


def layer_indices(n_teacher: int, n: int) -> list[int]:
    """The teacher layers a depth-``n`` student keeps: evenly strided from 0 (every other one for n = L/2)."""
    if not 1 <= n <= n_teacher:
        raise SlimlmError(f"--layers {n}: the student needs 1 to {n_teacher} layers (the teacher has {n_teacher})")
    return [i * n_teacher // n for i in range(n)]


@torch.no_grad()
def keep_layers_(model: nn.Module, keep: list[int]) -> None:
    """Keep only decoder layers ``keep`` of a runtime model, in place, and update its config."""
    layers = list(model.model.layers)  # type: ignore[union-attr, arg-type]
    mc: Any = model.config  # a ModelConfig
    new = []
    for new_i, i in enumerate(keep):
        layer = layers[i]
        layer.self_attn.layer_idx = new_i  # the cache slot of the layer
        layer.__dict__.pop("_plan", None)  # a decode plan built for the old index
        new.append(layer)
    model.model.layers = nn.ModuleList(new)  # type: ignore[union-attr]
    if mc.layer_types:
        mc.layer_types = [mc.layer_types[i] for i in keep]
    mc.num_hidden_layers = len(keep)


def check_compatible(teacher: Any, student: Any, what: str = "the student") -> None:
    """Refuse a student whose vocabulary or tokenizer differs from the teacher's (one line)."""
    vt, vs = teacher.model.config.vocab_size, student.model.config.vocab_size
    if vt != vs:
        raise SlimlmError(f"{what}'s vocabulary ({vs} tokens) differs from the teacher's ({vt}): "
                          "distillation needs the same tokenizer")
    tt, ts = teacher.tokenizer, student.tokenizer
    if tt is not None and ts is not None and _vocab(tt) != _vocab(ts):
        raise SlimlmError(f"{what}'s tokenizer differs from the teacher's: distillation needs the same tokenizer")


def _vocab(tok: Any) -> Any:
    backend = getattr(tok, "backend", tok)
    return backend.get_vocab() if hasattr(backend, "get_vocab") else None


def build_student(teacher_spec: str, cfg: DistillConfig, teacher: Any, dtype: torch.dtype = torch.float32) -> Any:
    """The student ``LoadedModel`` of ``cfg`` (every weight trainable, float), checked against ``teacher``."""
    from slimlm.loaders import load_model

    n_teacher = teacher.model.config.num_hidden_layers
    if cfg.student == EVERY_OTHER:
        keep = layer_indices(n_teacher, cfg.layers or max(1, n_teacher // 2))
        student = load_model(teacher_spec, dtype=dtype, dequantize=True)
        keep_layers_(student.model, keep)
        student.meta = {**student.meta, "student_layers_from_teacher": keep}
    else:
        if cfg.layers:
            raise SlimlmError("--layers applies to --student every-other-layer (a saved student keeps its depth)")
        student = load_model(cfg.student, dtype=dtype, dequantize=True)
        check_compatible(teacher, student, f"the student {cfg.student}")
    student.model.requires_grad_(True)
    return student


__all__ = ["build_student", "check_compatible", "keep_layers_", "layer_indices"]
