"""Distillation through the one trainer loop, on tiny runtime models and a fixed Markov-chain language.

- the objective of one batch equals CE + ``T^2 * F.kl_div`` of the teacher's and student's logits (and
  ``F.cosine_embedding_loss`` of the projected hidden states) computed here by hand;
- ``alpha = 0`` (and no hidden term) trains exactly like the teacher-free trainer: every weight equal
  bit for bit (torch.equal);
- a learned projection (student narrower than the teacher) is trained by the loop;
- every-other-layer init copies the teacher's layers 0, 2 (of 4) with embeddings, norm and head;
  a saved student is accepted; bad students are one-line errors;
- **acceptance**: a 2-layer student distilled from a trained 4-layer teacher reaches a lower held-out
  perplexity than the same student (same init, data, steps, seed) trained without the teacher.

Run: ``.venv/bin/python -m pytest tests/distill/test_distill.py``
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from slimlm.distill.config import DistillConfig
from slimlm.distill.objective import DistillLoss
from slimlm.distill.student import build_student, layer_indices
from slimlm.loaders import load_model
from slimlm.train.config import TrainConfig
from slimlm.train.data import collate, pack
from slimlm.train.loop import Trainer, forward_logits
from slimlm.utils.errors import SlimlmError
from tests.distill.tiny import chain, make_model, sample, save

L = 32  # tokens per sequence


@pytest.fixture(scope="module")
def lang() -> torch.Tensor:
    return chain(64, k=4, seed=0)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, lang) -> Path:  # type: ignore[no-untyped-def]
    """A 4-layer teacher trained (CE) on 400 chain sequences: held-out ppl ~4.2 (the chain's own is 3.7;
    the untrained model's is 64)."""
    d = tmp_path_factory.mktemp("teacher")
    make_model(d / "init", seed=0)
    lm = load_model(str(d / "init"))
    lm.model.requires_grad_(True)
    cfg = TrainConfig(max_steps=60, batch_size=8, seq_len=L, lr=1e-2, dtype="fp32", warmup_steps=10, packing=False)
    Trainer(lm.model, cfg, sample(lang, 400, L, seed=1), progress=False).train()
    lm.model.requires_grad_(False)
    return save(lm.model, d / "trained")


@pytest.fixture(scope="module")
def teacher(teacher_dir):  # type: ignore[no-untyped-def]
    return load_model(str(teacher_dir))


def _cfg(**kw):  # type: ignore[no-untyped-def]
    base = dict(max_steps=20, batch_size=4, seq_len=L, lr=3e-3, dtype="fp32", packing=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def test_objective_equals_hand_computed_ce_plus_kl(teacher, teacher_dir, lang) -> None:
    dc = DistillConfig(layers=2, alpha=0.3, temperature=2.0, kd_loss="fwd_kl")
    st = build_student(str(teacher_dir), dc, teacher)
    ex = sample(lang, 2, L, seed=5)
    ex[0].labels[:5] = [-100] * 5  # a masked prompt: those targets count in neither term
    b = collate(pack(ex, L, packing=False))
    logits = forward_logits(st.model, b)
    ours = DistillLoss(teacher.model, st.model, dc)(st.model, b, logits)
    with torch.no_grad():
        t_logits = teacher.model(b["input_ids"])
    keep = b["labels"][:, 1:] != -100
    s_, t_ = logits[:, :-1][keep], t_logits[:, :-1][keep]
    ce = F.cross_entropy(s_, b["labels"][:, 1:][keep], reduction="sum")
    kl = F.kl_div(F.log_softmax(s_ / 2, -1), F.log_softmax(t_ / 2, -1), log_target=True, reduction="sum") * 4
    torch.testing.assert_close(ours, 0.7 * ce + 0.3 * kl, rtol=1e-5, atol=1e-5)
    rev = DistillLoss(teacher.model, st.model, DistillConfig(alpha=1.0, temperature=1.0, kd_loss="rev_kl"))
    kl_r = F.kl_div(F.log_softmax(t_, -1), F.log_softmax(s_, -1), log_target=True, reduction="sum")
    torch.testing.assert_close(rev(st.model, b, logits), kl_r, rtol=1e-5, atol=1e-5)


def test_alpha_zero_is_teacher_free_training_bit_for_bit(teacher, teacher_dir, lang) -> None:
    dc = DistillConfig(layers=2, alpha=0.0, temperature=2.0)
    data = sample(lang, 8, L, seed=3)
    a = build_student(str(teacher_dir), dc, teacher)
    b = build_student(str(teacher_dir), dc, teacher)
    Trainer(a.model, _cfg(max_steps=4), data, progress=False).train()
    loss = DistillLoss(teacher.model, b.model, dc)
    Trainer(b.model, _cfg(max_steps=4), data, progress=False, loss_fn=loss).train()
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # and a KD weight really changes the run
    c = build_student(str(teacher_dir), dc, teacher)
    Trainer(c.model, _cfg(max_steps=4), data, progress=False,
            loss_fn=DistillLoss(teacher.model, c.model, DistillConfig(layers=2, alpha=0.5))).train()
    assert not torch.equal(c.model.state_dict()["model.layers.0.mlp.down_proj.weight"],
                           sa["model.layers.0.mlp.down_proj.weight"])


def test_hidden_alignment_with_learned_projection(teacher, lang, tmp_path) -> None:
    make_model(tmp_path / "narrow", seed=1, hidden=32, layers=2)
    dc = DistillConfig(student=str(tmp_path / "narrow"), alpha=0.0, hidden_loss="cosine", hidden_weight=1.0)
    st = build_student("unused", dc, teacher)
    loss = DistillLoss(teacher.model, st.model, dc)
    assert loss.proj is not None and tuple(loss.proj.weight.shape) == (64, 32)
    b = collate(pack(sample(lang, 2, L, seed=6), L, packing=False))
    caught: dict[str, torch.Tensor] = {}
    for name, m in (("s", st.model), ("t", teacher.model)):  # an independent capture of the last hidden state
        m.model.layers[-1].register_forward_hook(lambda _m, _a, out, name=name: caught.__setitem__(name, out))
    logits = forward_logits(st.model, b)
    value = loss(st.model, b, logits)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, 64), b["labels"][:, 1:].reshape(-1), reduction="sum")
    hs, ht = caught["s"][:, :-1].reshape(-1, 32), caught["t"][:, :-1].reshape(-1, 64)
    cos = F.cosine_embedding_loss(loss.proj(hs), ht, torch.ones(hs.shape[0]), reduction="sum")
    torch.testing.assert_close(value, ce + cos, rtol=1e-5, atol=1e-5)
    w0 = loss.proj.weight.detach().clone()
    Trainer(st.model, _cfg(max_steps=3), sample(lang, 8, L, seed=3), progress=False, loss_fn=loss).train()
    assert not torch.equal(w0, loss.proj.weight)  # the loop optimized the projection
    loss.close()
    assert not st.model.model.norm._forward_pre_hooks


def test_every_other_layer_init_and_bad_students(teacher, teacher_dir, tmp_path) -> None:
    assert layer_indices(4, 2) == [0, 2] and layer_indices(30, 5) == [0, 6, 12, 18, 24]
    assert layer_indices(4, 4) == [0, 1, 2, 3] and layer_indices(30, 4) == [0, 7, 15, 22]
    st = build_student(str(teacher_dir), DistillConfig(), teacher)  # layers=0: half
    assert st.model.config.num_hidden_layers == 2 and len(st.model.model.layers) == 2
    ts, ss = teacher.model.state_dict(), st.model.state_dict()
    for k, v in ss.items():
        src = k.replace("layers.1.", "layers.2.")  # student layer 1 = teacher layer 2
        assert torch.equal(v, ts[src]), k
    assert all(p.requires_grad for p in st.model.parameters())
    with pytest.raises(SlimlmError, match="1 to 4 layers"):
        build_student(str(teacher_dir), DistillConfig(layers=5), teacher)
    make_model(tmp_path / "other_vocab", vocab=80, layers=1)
    with pytest.raises(SlimlmError, match="vocabulary"):
        build_student("unused", DistillConfig(student=str(tmp_path / "other_vocab")), teacher)
    with pytest.raises(SlimlmError, match="--layers applies"):
        build_student("unused", DistillConfig(student=str(tmp_path / "other_vocab"), layers=1), teacher)


def test_distilled_student_beats_teacher_free_training(teacher, teacher_dir, lang) -> None:
    """The acceptance check. Same 2-layer student (the teacher's layers 0, 2), same 16 training sequences,
    20 steps, seed and held-out set; only the objective differs (alpha 0.9, T=1 vs CE). Measured: ppl
    ~4.2-4.3 distilled vs ~5.9 teacher-free (the student's start: ~4.6; the teacher: ~4.2): 16 sequences
    do not pin down the chain's 4-way branching from one-hot labels (CE overfits them), the teacher's
    distributions do. Three other chain / data / init seeds gave ratios 0.72, 0.85 and 0.76 (4.63 vs 6.44,
    4.71 vs 5.57, 4.67 vs 6.13): asserted ratio < 0.9, a bound every seed tried clears."""
    train, held = sample(lang, 16, L, seed=3), sample(lang, 32, L, seed=2)
    ppl = {}
    for name, alpha in (("scratch", None), ("distilled", 0.9)):
        st = build_student(str(teacher_dir), DistillConfig(layers=2), teacher)
        loss = None if alpha is None else DistillLoss(teacher.model, st.model, DistillConfig(alpha=alpha,
                                                                                             temperature=1.0))
        res = Trainer(st.model, _cfg(), train, held, progress=False, loss_fn=loss).train()
        assert res.eval_loss is not None
        ppl[name] = math.exp(res.eval_loss)
    assert ppl["distilled"] < 0.9 * ppl["scratch"], ppl


def test_sequence_kd_examples_are_prompt_plus_teacher_continuation() -> None:
    from slimlm.distill.sequence import prompt_of, teacher_examples
    from slimlm.train.data import Example

    ex = [Example([5, 6, 7, 8, 9], [-100, -100, 7, 8, 9]), Example([1, 2, 3, 4], [1, 2, 3, 4])]
    assert prompt_of(ex[0]) == [5, 6] and prompt_of(ex[1]) == [1, 2]  # text: its first half
    seen: list[list[int]] = []

    def gen(prompts: list[list[int]]) -> list[list[int]]:
        seen.extend(prompts)
        return [[p[-1] + 10, p[-1] + 20] for p in prompts]

    out = teacher_examples(ex, gen)
    assert seen == [[5, 6], [1, 2]]
    assert [e.ids for e in out] == [[5, 6, 16, 26], [1, 2, 12, 22]]
    assert [e.labels for e in out] == [[-100, -100, 16, 26], [-100, -100, 12, 22]]


def test_set_examples_switches_the_training_data(teacher, teacher_dir, lang) -> None:
    """On-policy KD swaps the trainer's examples between steps (``Trainer.set_examples``)."""
    from slimlm.train.data import Example

    st = build_student(str(teacher_dir), DistillConfig(layers=1), teacher)
    tr = Trainer(st.model, _cfg(max_steps=3), sample(lang, 8, L, seed=3), progress=False)
    tr.train_step()
    new = [Example([7] * L, [7] * L)]
    tr.set_examples(new)
    batch = tr._micro_batches()[0]
    assert bool((batch["input_ids"] == 7).all())


def test_structured_pruned_student_recovers_by_distillation(teacher, teacher_dir, lang, tmp_path) -> None:
    """The Sheared-LLaMA route: ``slimlm prune --structured``'s transform (2 of 4 layers, MLP 128 -> 64), saved,
    then distilled as the student. Measured: held-out ppl 5.08 pruned -> 4.45 distilled (5.94 with CE alone);
    asserted: eval loss at least 0.05 nats lower than the pruned model's (0.13 measured)."""
    from slimlm.sparsity.structured import StructuredPruneConfig, structured_prune_

    lm = load_model(str(teacher_dir))
    calib = [torch.tensor(e.ids) for e in sample(lang, 4, L, seed=7)]
    structured_prune_(lm.model, StructuredPruneConfig(remove_layers=2, intermediate_size=64), calib, progress=False)
    pruned = save(lm.model, tmp_path / "pruned")
    st = build_student("unused", DistillConfig(student=str(pruned)), teacher)
    assert (st.model.config.num_hidden_layers, st.model.config.intermediate_size) == (2, 64)
    held = sample(lang, 32, L, seed=2)
    tr = Trainer(st.model, _cfg(max_steps=20), sample(lang, 16, L, seed=3), held, progress=False,
                 loss_fn=DistillLoss(teacher.model, st.model, DistillConfig(alpha=0.9, temperature=1.0)))
    before = tr.evaluate()
    res = tr.train()
    assert before is not None and res.eval_loss is not None
    assert res.eval_loss < before["eval_loss"] - 0.05, (before, res.eval_loss)
