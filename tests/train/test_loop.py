"""The trainer loop against independent oracles.

- loss: the first step's loss equals masked cross-entropy computed by hand with torch.nn.functional on
  transformers' model of the same tiny config (each example run alone), packed or not, with gradient
  accumulation normalizing over the whole step's target tokens;
- packing: packed logits equal each segment run alone (llama, gemma3 with a sliding window, opt with
  learned positions);
- activation checkpointing: the same gradients as without;
- resume: N steps straight == N/2 steps, then resume for N/2 in a fresh model, bit for bit (torch.equal);
- Ctrl-C (KeyboardInterrupt from a callback, or in the middle of writing a checkpoint) leaves the last
  complete checkpoint intact and resumable; a checkpoint of another model is refused in one line.

Run: ``.venv/bin/python -m pytest tests/train/test_loop.py``
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from slimlm.loaders import load_model
from slimlm.peft import LoraConfig, apply_peft
from slimlm.train.checkpoint import checkpoints
from slimlm.train.config import TrainConfig
from slimlm.train.data import collate, pack, read_examples
from slimlm.train.loop import Trainer
from slimlm.train.schedule import lr_factor, window_len
from slimlm.utils.errors import CheckpointError
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer

RECORDS = [{"prompt": "Question: what is two plus two?\nAnswer: ", "completion": "Four."},
           {"prompt": "Translate: bonjour\n", "completion": "hello"},
           {"prompt": "Name a colour: ", "completion": "Blue, like the sky at noon."}]


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return make_tiny_tokenizer(384)


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("base")
    hf = make_hf_model("llama", d, vocab_size=384)
    tok.save(d)
    return d, hf


@pytest.fixture
def data(tmp_path):  # type: ignore[no-untyped-def]
    f = tmp_path / "d.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return str(f)


def _cfg(**kw):  # type: ignore[no-untyped-def]
    base = dict(max_steps=4, batch_size=1, grad_accum=1, seq_len=64, lr=1e-2, dtype="fp32", max_grad_norm=1.0,
                warmup_steps=1)
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("packing", [False, True])
def test_first_step_loss_is_masked_cross_entropy_of_transformers_model(base, tok, data, packing):
    folder, hf = base
    lm = load_model(str(folder))
    lm.model.requires_grad_(True)  # full fine-tuning: the first step's forward is the base model
    # packed: one window holds all three; unpacked: 3 micro-batches of 1 (normalized over the step)
    cfg = _cfg(max_steps=1, packing=packing, grad_accum=1 if packing else 3, batch_size=1, seq_len=256)
    ex = read_examples(data, tok, cfg.seq_len)
    res = Trainer(lm.model, cfg, ex, progress=False).train()
    tot, n = 0.0, 0
    with torch.no_grad():
        for r in RECORDS:  # the oracle: transformers, each example alone, CE by hand
            p, c = tok.encode(r["prompt"]), tok.encode(r["completion"]) + [tok.eos_token_id]
            ids = torch.tensor([p + c])
            logits = hf(ids).logits[0, :-1]
            target = torch.tensor(p + c)[1:]
            mask = torch.arange(len(p) + len(c))[1:] >= len(p)
            tot += float(F.cross_entropy(logits[mask], target[mask], reduction="sum"))
            n += int(mask.sum())
    assert res.history[0]["target_tokens"] == n
    assert res.history[0]["loss"] == pytest.approx(tot / n, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])
def test_packed_logits_equal_each_segment_alone(tmp_path, family):
    make_hf_model(family, tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    from slimlm.train.data import Example
    from slimlm.train.loop import forward_logits

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (9, 5, 12)]
    (w,) = pack([Example(s, s) for s in seqs], seq_len=40)
    with torch.no_grad():
        packed = forward_logits(lm.model, collate([w]))[0]
        start = 0
        for s in seqs:
            alone = lm.model(torch.tensor([s]))[0]
            torch.testing.assert_close(packed[start:start + len(s)], alone, rtol=1e-5, atol=1e-5)
            start += len(s)


def test_activation_checkpointing_gives_the_same_gradients(base):
    folder, _ = base
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = []
    for ckpt in (False, True):
        lm = load_model(str(folder))
        torch.manual_seed(0)  # the same random adapters both times
        apply_peft(lm.model, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights="random"))
        lm.model.gradient_checkpointing = ckpt
        logits = lm.model(ids)
        F.cross_entropy(logits[:, :-1].reshape(-1, 384), ids[:, 1:].reshape(-1)).backward()
        grads.append({n: p.grad.clone() for n, p in lm.model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ckpt", [False, True])
def test_trainer_config_turns_checkpointing_on(base, tok, data, ckpt):  # type: ignore[no-untyped-def]
    """``TrainConfig(activation_checkpointing=True)`` given to the Trainer (not only the CLI) recomputes
    each decoder layer in backward: layer 0 then starts twice per step (forward + recompute; a pre-hook,
    since the recompute stops early, before a forward hook would run)."""
    folder, _ = base
    lm = load_model(str(folder))
    apply_peft(lm.model, LoraConfig(r=4, target_modules=["q_proj"]))
    calls = []
    lm.model.model.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    cfg = _cfg(max_steps=1, seq_len=64, activation_checkpointing=ckpt)
    Trainer(lm.model, cfg, read_examples(data, tok, cfg.seq_len)[:1], progress=False).train()
    assert len(calls) == (2 if ckpt else 1)


class _Stop(Exception):
    pass


def _lora_model(folder):  # type: ignore[no-untyped-def]
    lm = load_model(str(folder))
    torch.manual_seed(0)
    apply_peft(lm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1))
    return lm


def _trainable(model):  # type: ignore[no-untyped-def]
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_resume_is_bit_exact(base, tok, data, tmp_path):
    folder, _ = base
    cfg = _cfg(max_steps=6, batch_size=2, grad_accum=2, save_every=3, packing=False)  # dropout: RNG matters
    ex = read_examples(data, tok, cfg.seq_len)
    straight = _lora_model(folder)
    Trainer(straight.model, cfg, ex, checkpoint_dir=tmp_path / "a", progress=False).train()

    def stop(trainer, row):  # type: ignore[no-untyped-def]
        if row["step"] == 3:  # the same run (same schedule), stopped after its step-3 checkpoint
            raise _Stop

    first = _lora_model(folder)
    with pytest.raises(_Stop):
        Trainer(first.model, cfg, ex, checkpoint_dir=tmp_path / "b", callbacks=[stop], progress=False).train()
    second = _lora_model(folder)  # a fresh process would start like this
    torch.manual_seed(123)  # whatever the global RNG holds, the checkpoint's state wins
    tr = Trainer(second.model, cfg, ex, checkpoint_dir=tmp_path / "b", resume=tmp_path / "b", progress=False)
    assert tr.step == 3
    tr.train()
    a, b = _trainable(straight.model), _trainable(second.model)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert not all(torch.equal(a[k], v) for k, v in _trainable(_lora_model(folder).model).items())  # it trained
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_ctrl_c_keeps_the_last_complete_checkpoint(base, tok, data, tmp_path, monkeypatch):
    folder, _ = base
    cfg = _cfg(max_steps=4, save_every=2, batch_size=2, packing=True)
    ex = read_examples(data, tok, cfg.seq_len)
    straight = _lora_model(folder)
    Trainer(straight.model, cfg, ex, progress=False).train()

    def interrupt(trainer, row):  # type: ignore[no-untyped-def]
        if row["step"] == 3:
            raise KeyboardInterrupt

    lm = _lora_model(folder)
    with pytest.raises(KeyboardInterrupt):
        Trainer(lm.model, cfg, ex, checkpoint_dir=tmp_path / "c", callbacks=[interrupt], progress=False).train()
    assert [p.name for p in checkpoints(tmp_path / "c")] == ["step-000002"]

    # Ctrl-C while step 4's checkpoint is being written: step 2 stays, no half-written folder appears
    import slimlm.train.checkpoint as ck

    real = ck.torch.save

    def save_then_interrupt(obj, f):  # type: ignore[no-untyped-def]
        real(obj, f)
        if str(f).endswith("scheduler.pt"):
            raise KeyboardInterrupt

    lm2 = _lora_model(folder)
    tr = Trainer(lm2.model, cfg, ex, checkpoint_dir=tmp_path / "c", resume=tmp_path / "c", progress=False)
    monkeypatch.setattr(ck.torch, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    monkeypatch.setattr(ck.torch, "save", real)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["metrics.jsonl", "step-000002"]

    lm3 = _lora_model(folder)
    Trainer(lm3.model, cfg, ex, checkpoint_dir=tmp_path / "c", resume=tmp_path / "c", progress=False).train()
    a, b = _trainable(straight.model), _trainable(lm3.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_another_model_is_one_line(base, tok, data, tmp_path):
    folder, _ = base
    cfg = _cfg(max_steps=1)
    ex = read_examples(data, tok, cfg.seq_len)
    Trainer(_lora_model(folder).model, cfg, ex, checkpoint_dir=tmp_path / "k", progress=False).train()
    make_hf_model("llama", tmp_path / "other", vocab_size=384, hidden_size=32, intermediate_size=64)
    other = load_model(str(tmp_path / "other"))
    apply_peft(other.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    with pytest.raises(CheckpointError, match="written for model") as e:
        Trainer(other.model, cfg, ex, resume=tmp_path / "k", progress=False)
    assert "\n" not in str(e.value)
    lm = load_model(str(folder))
    apply_peft(lm.model, LoraConfig(r=2, target_modules=["q_proj"]))  # same model, other adapter
    with pytest.raises(CheckpointError, match="differ"):
        Trainer(lm.model, cfg, ex, resume=tmp_path / "k", progress=False)


def test_training_lowers_the_loss_with_bf16_autocast(base, tok, data):
    folder, _ = base
    lm = _lora_model(folder)
    cfg = _cfg(max_steps=12, batch_size=3, dtype="bf16", lr=2e-2, eval_fraction=0.0, packing=True)
    res = Trainer(lm.model, cfg, read_examples(data, tok, cfg.seq_len), progress=False).train()
    losses = [h["loss"] for h in res.history]
    assert losses[-1] < 0.95 * losses[0] and losses[-1] == min(losses), losses
    assert all(p.dtype == torch.float32 for p in lm.model.parameters() if p.requires_grad)  # fp32 master weights


def test_schedules():
    cfg = TrainConfig(max_steps=10, warmup_steps=2, lr=1.0, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cfg) for s in (0, 1)] == [0.5, 1.0]
    assert lr_factor(2, cfg) == pytest.approx(1.0) and lr_factor(10, cfg) == pytest.approx(0.1)
    assert lr_factor(6, cfg) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the decay
    lin = TrainConfig(max_steps=10, warmup_steps=0, schedule="linear")
    assert lr_factor(5, lin) == pytest.approx(0.5)
    grow = TrainConfig(max_steps=9, seq_len=64, grow_length=True)
    assert [window_len(s, grow) for s in range(9)] == [16, 16, 16, 32, 32, 32, 64, 64, 64]


def test_grow_length_trains_short_windows_first(base, tok, data):
    folder, _ = base
    cfg = _cfg(max_steps=3, seq_len=64, grow_length=True, packing=False, batch_size=3)
    res = Trainer(_lora_model(folder).model, cfg, read_examples(data, tok, 64), progress=False).train()
    windows = [h["window"] for h in res.history]
    assert windows[0] <= 16 and windows[1] <= 32 and windows[2] > 32, windows  # the examples are 20-30 tokens
