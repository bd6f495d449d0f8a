"""Frozen weights kept in bf16 during a bf16 run (slimlm.train.frozen) against torch's own autocast.

- the split into a bf16 tensor + remainder is exact: join gives back the fp32 bits (ties, signs,
  subnormals, the largest finite values), and the bf16 part is ``w.to(bfloat16)``, the copy autocast makes;
- oracle: LoRA/IA3 steps in bf16 with the frozen base stored in bf16 give bit-identical losses and trained
  tensors to the same steps under plain autocast over fp32 weights (``frozen_bf16=False``);
- after ``train()`` every base weight is fp32 again, bit for bit (also after a Ctrl-C);
- what must stay fp32 does: a tied embedding/head, a DoRA layer's base.

Run: ``.venv/bin/python -m pytest tests/train/test_frozen.py``
"""

from __future__ import annotations

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.peft import IA3Config, LoraConfig, apply_peft
from slimlm.train.config import TrainConfig
from slimlm.train.data import Example
from slimlm.train.frozen import FrozenCast, join_bf16, split_bf16
from slimlm.train.loop import Trainer
from tests.helpers.models import make_hf_model


def test_split_join_is_exact_and_hi_is_autocasts_copy():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3000, generator=g) * torch.logspace(-40, 38, 3000)
    bits = torch.randint(0, 1 << 16, (64,), generator=g, dtype=torch.int32) << 16
    ties = (bits | 0x8000).view(torch.float32)  # exactly half-way between two bf16 values: both parities
    ties = ties[torch.isfinite(ties)]  # (NaN payloads are not split: FrozenCast leaves such tensors alone)
    special = torch.tensor([0.0, -0.0, 1e-45, -1e-45, 3.4028235e38, -3.4028235e38, 1.0, -2.5])
    w = torch.cat([w, ties, -ties, special])
    hi, rem, tie_pos = split_bf16(w)
    assert torch.equal(hi.view(torch.int16), w.to(torch.bfloat16).view(torch.int16))
    assert tie_pos.numel() > 0  # some ties rounded down: the +2^15 remainders took the side list
    back = join_bf16(hi, rem, tie_pos)
    assert torch.equal(back.view(torch.int32), w.view(torch.int32))


def _run(folder, method, frozen_bf16, steps=3):  # type: ignore[no-untyped-def]
    lm = load_model(str(folder))
    lm.model.unfuse_projections_()  # as the cast does: a fused gate|up matmul rounds unlike two matmuls
    torch.manual_seed(0)
    apply_peft(lm.model, method)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(1)
    ex = [Example(s, s) for s in torch.randint(3, 256, (8, 32), generator=g).tolist()]
    cfg = TrainConfig(max_steps=steps, batch_size=2, seq_len=32, lr=1e-2, dtype="bf16", frozen_bf16=frozen_bf16,
                      warmup_steps=0, packing=False)
    tr = Trainer(lm.model, cfg, ex, progress=False)
    dtypes = {n: p.dtype for n, p in lm.model.named_parameters()}  # while training
    res = tr.train()
    trained = {n: p.detach().clone() for n, p in lm.model.named_parameters() if p.requires_grad}
    after = {n: p.detach() for n, p in lm.model.named_parameters() if not p.requires_grad}
    return [r["loss"] for r in res.history], trained, before, after, dtypes, tr.frozen


@pytest.mark.parametrize("method", [LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
                                    IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"])],
                         ids=["lora", "ia3"])
def test_bf16_frozen_base_equals_autocast_bit_for_bit_and_is_restored(tmp_path, method):
    make_hf_model("llama", tmp_path / "m")  # untied head: it is cast too
    ref_loss, ref_trained, _, _, ref_dtypes, _ = _run(tmp_path / "m", method, frozen_bf16=False)
    loss, trained, before, after, dtypes, frozen = _run(tmp_path / "m", method, frozen_bf16=True)
    assert all(d == torch.float32 for d in ref_dtypes.values())
    cast = [n for n, d in dtypes.items() if d == torch.bfloat16]
    assert any("lm_head" in n or n.endswith("head.weight") for n in cast) and any("o_proj" in n for n in cast)
    assert not any("embed" in n or "norm" in n for n in cast)
    assert loss == ref_loss  # exactly: the same bf16 matmuls
    assert ref_trained.keys() == trained.keys()
    for n, t in trained.items():
        assert torch.equal(t, ref_trained[n]), n
    for n, t in before.items():  # restored: fp32, the original bits
        assert after[n].dtype == torch.float32 and torch.equal(after[n].view(torch.int32), t.view(torch.int32)), n
    assert frozen.count == 0  # restore() empties it


def test_tied_embedding_and_dora_base_stay_fp32(tmp_path):
    make_hf_model("llama_tied_rope_llama3", tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    apply_peft(lm.model, LoraConfig(r=4, target_modules=["q_proj", "o_proj"], use_dora=True))
    cast = FrozenCast.apply(lm.model, torch.bfloat16)
    types = {n: p.dtype for n, p in lm.model.named_parameters()}
    assert types["model.embed_tokens.weight"] == torch.float32  # the tied head shares it
    assert all(d == torch.float32 for n, d in types.items() if "q_proj" in n or "o_proj" in n)  # DoRA reads W
    assert any(d == torch.bfloat16 for n, d in types.items() if "k_proj" in n)  # a plain frozen linear
    cast.restore()
    assert all(p.dtype == torch.float32 for p in lm.model.parameters())


def test_ctrl_c_restores_the_base(tmp_path):
    make_hf_model("llama", tmp_path / "m")
    lm = load_model(str(tmp_path / "m"))
    apply_peft(lm.model, LoraConfig(r=4, target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters() if not p.requires_grad}
    ex = [Example(list(range(3, 35)), list(range(3, 35)))] * 4

    def stop(trainer, row):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt

    tr = Trainer(lm.model, TrainConfig(max_steps=3, batch_size=1, seq_len=32, dtype="bf16"), ex, progress=False,
                 callbacks=[stop])
    with pytest.raises(KeyboardInterrupt):
        tr.train()
    for n, p in lm.model.named_parameters():
        if n in before:
            assert p.dtype == torch.float32 and torch.equal(p, before[n]), n


def _grads_and_saved(folder, plain, monkeypatch):  # type: ignore[no-untyped-def]
    import torch.nn.functional as F

    import slimlm.models.autocast as autocast
    import slimlm.peft.lora.layer as lora_layer

    if plain:  # every matmul casts its own copy, as torch's autocast does by itself
        monkeypatch.setattr(autocast, "autocast_input", lambda x: x)
        monkeypatch.setattr(lora_layer, "autocast_input", lambda x: x)
    lm = load_model(str(folder))
    torch.manual_seed(0)
    apply_peft(lm.model, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"], init_lora_weights="random"))
    ids = torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(0))  # 48 tokens: no width is 48
    saved: dict[int, int] = {}

    def pack(t):  # type: ignore[no-untyped-def]  # bf16 activations autograd keeps, by storage
        acts = t.dim() >= 2 and (t.shape[0] == 48 or tuple(t.shape[:2]) == (2, 24))  # [B*T, ..] / [B, T, ..]
        if acts and t.dtype == torch.bfloat16:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm.model(ids)
    loss = F.cross_entropy(out[:, :-1].float().reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1))
    loss.backward()
    monkeypatch.undo()
    return loss, {n: p.grad for n, p in lm.model.named_parameters() if p.requires_grad}, sum(saved.values())


def test_one_shared_bf16_copy_gives_autocasts_gradients_with_fewer_saved_bytes(tmp_path, monkeypatch):
    make_hf_model("llama", tmp_path / "m")
    ref_loss, ref_grads, ref_saved = _grads_and_saved(tmp_path / "m", True, monkeypatch)
    loss, grads, saved = _grads_and_saved(tmp_path / "m", False, monkeypatch)
    assert torch.equal(loss, ref_loss)
    for n, g in grads.items():  # the gradients still meet in fp32 at the shared input: bit-identical
        assert torch.equal(g, ref_grads[n]), n
    assert saved < 0.8 * ref_saved, (saved, ref_saved)  # one copy of each normed input, not one per matmul
