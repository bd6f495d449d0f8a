"""LoRA invariants on a tiny model: training lowers the loss and leaves the base bit for bit, save ->
load reproduces logits exactly, merge / unmerge / unload keep the logits, dropout and init behave,
quantized bases train, bad input gets one clear error.

Run: ``.venv/bin/python -m pytest tests/peft/test_lora_invariants.py``
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimlm.loaders import load_model
from slimlm.peft import (
    LoraConfig,
    LoraLinear,
    adapter_modules,
    apply_peft,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    save_adapter,
    unload,
    unmerge_adapters,
)
from slimlm.utils.errors import CheckpointError, ConfigError, SlimlmError
from tests.helpers.models import make_hf_model

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def base_dir(tmp_path):  # type: ignore[no-untyped-def]
    make_hf_model("llama", tmp_path / "base")
    return tmp_path / "base"


def _data() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (4, 16), generator=g)  # a fixed tiny dataset: 4 sequences of 16 tokens


def _loss(model: nn.Module, ids: torch.Tensor, skip: int = 0) -> torch.Tensor:
    """Next-token loss; ``skip`` drops the virtual tokens' positions (prompt tuning / P-tuning)."""
    logits = model(ids)[:, skip:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _train(model: nn.Module, steps: int = 25, lr: float = 1e-2, skip: int = 0) -> list[float]:
    ids = _data()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = _loss(model, ids, skip)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


def check_save_load_and_merge(model: nn.Module, base_dir, folder) -> None:  # type: ignore[no-untyped-def]
    """Shared by every method: save -> load on a fresh base gives the same logits bit for bit; merge,
    unmerge and merge_and_unload keep them to 1e-5."""
    ids = _data()
    save_adapter(model, folder)
    with torch.no_grad():
        ref = model(ids)
    fresh = load_model(str(base_dir))
    load_adapter(fresh.model, folder)
    with torch.no_grad():
        assert torch.equal(fresh.model(ids), ref)
        merge_adapters(model)
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)
        unmerge_adapters(model)
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)
        merge_and_unload(model)
        assert not adapter_modules(model)
        torch.testing.assert_close(model(ids), ref, rtol=1e-5, atol=1e-5)


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}


def test_training_lowers_the_loss_and_leaves_the_base_bit_for_bit(base_dir) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(str(base_dir))
    before = _base_state(lm.model)
    report = apply_peft(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL))
    assert report.trainable_params == sum(p.numel() for n, p in lm.model.named_parameters() if ".lora_" in n)
    assert all(not p.requires_grad for n, p in lm.model.named_parameters() if ".lora_" not in n)
    losses = _train(lm.model)
    assert losses[-1] < 0.9 * losses[0], losses
    after = _base_state(lm.model)
    assert before.keys() == after.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k


def test_save_then_load_reproduces_logits_exactly(base_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(str(base_dir))
    apply_peft(lm.model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "up_proj"], use_rslora=True))
    _train(lm.model, steps=5)
    save_adapter(lm.model, tmp_path / "adapter")
    ids = _data()
    with torch.no_grad():
        ref = lm.model(ids)
    fresh = load_model(str(base_dir))
    load_adapter(fresh.model, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh.model(ids), ref)
    save_adapter(lm.model, tmp_path / "adapter")  # overwriting its own adapter folder is fine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(SlimlmError, match="not an adapter folder"):
        save_adapter(lm.model, tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").read_text() == "x"


def test_merge_unmerge_and_unload_keep_the_logits(base_dir) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(str(base_dir))
    base_w = lm.model.model.layers[0].self_attn.q_proj.weight.clone()
    apply_peft(lm.model, LoraConfig(r=4, target_modules=ALL, init_lora_weights="random"))
    ids = _data()
    with torch.no_grad():
        base = load_model(str(base_dir)).model(ids)
        ref = lm.model(ids)
        assert not torch.allclose(ref, base)  # the adapter does something
        merge_adapters(lm.model)
        torch.testing.assert_close(lm.model(ids), ref, rtol=1e-5, atol=1e-5)
        unmerge_adapters(lm.model)
        torch.testing.assert_close(lm.model(ids), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(lm.model.model.layers[0].self_attn.q_proj.base_layer.weight, base_w,
                                   rtol=0, atol=1e-6)
        merge_and_unload(lm.model)
        assert not any(isinstance(m, LoraLinear) for m in lm.model.modules())
        assert lm.model.model.layers[0].self_attn._fusion is not None  # q|k|v fused again for inference
        torch.testing.assert_close(lm.model(ids), ref, rtol=1e-5, atol=1e-5)


def test_unload_without_merge_restores_the_base(base_dir) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(str(base_dir))
    ids = _data()
    with torch.no_grad():
        ref = lm.model(ids)
    apply_peft(lm.model, LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights="random"))
    unload(lm.model)
    with torch.no_grad():
        assert torch.equal(lm.model(ids), ref)


def test_init_scaling_and_dropout(base_dir) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(str(base_dir))
    ids = _data()
    with torch.no_grad():
        ref = lm.model(ids)
    apply_peft(lm.model, LoraConfig(r=8, lora_alpha=4, target_modules=ALL, init_lora_weights="gaussian",
                                    use_rslora=True, lora_dropout=0.5))
    q = lm.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoraLinear)
    assert q.scaling == pytest.approx(4 / 8**0.5)
    assert float(q.lora_A.weight.detach().std()) == pytest.approx(1 / 8, rel=0.1)
    assert torch.count_nonzero(q.lora_B.weight) == 0
    with torch.no_grad():
        assert torch.equal(lm.model(ids), ref)  # B = 0: a no-op adapter at the start
        nn.init.normal_(q.lora_B.weight)
        lm.model.eval()
        e1, e2 = lm.model(ids), lm.model(ids)
        lm.model.train()
        t1, t2 = lm.model(ids), lm.model(ids)
    assert torch.equal(e1, e2) and not torch.allclose(t1, t2)  # dropout only in training mode


@pytest.mark.parametrize("method,values", [("rtn", {"bits": 4, "group_size": 32}), ("nf4", {}),
                                           ("rtn", {"bits": 8, "group_size": -1})])
def test_lora_trains_on_a_quantized_base(base_dir, method, values) -> None:  # type: ignore[no-untyped-def]
    from slimlm.quant import quantize_
    from slimlm.quant.api import config_for_method

    lm = load_model(str(base_dir))
    quantize_(lm.model, config_for_method(method, values))
    kinds = {type(m).__name__ for m in lm.model.modules()}
    before = _base_state(lm.model)
    apply_peft(lm.model, LoraConfig(r=4, target_modules=ALL))
    losses = _train(lm.model, steps=15)
    assert losses[-1] < 0.9 * losses[0], (kinds, losses)
    for k, v in before.items():
        assert torch.equal(v, _base_state(lm.model)[k]), k
    with pytest.raises(SlimlmError, match="merge_and_unload re-quantizes"):
        merge_adapters(lm.model)  # in place: only plain bases
    assert not any(m.merged for m in adapter_modules(lm.model).values())


@pytest.mark.parametrize("method,values", [("rtn", {"bits": 4, "group_size": 32}), ("nf4", {}),
                                           ("rtn", {"bits": 8, "group_size": -1})])
def test_merge_into_a_quantized_base_requantizes_and_reports_the_error(base_dir, method, values) -> None:  # type: ignore[no-untyped-def]
    from slimlm.quant import quantize_
    from slimlm.quant.api import config_for_method

    lm = load_model(str(base_dir))
    quantize_(lm.model, config_for_method(method, values))
    apply_peft(lm.model, LoraConfig(r=4, lora_alpha=2, target_modules=ALL, init_lora_weights="random"))
    ids = _data()
    with torch.no_grad():
        ref = lm.model(ids)  # the adapters unmerged: the exact model the merge approximates
        want = {p: (m.base_layer.dense_weight(), m.delta_weight(), m.base_layer.kind, m.base_layer.spec())
                for p, m in adapter_modules(lm.model).items()}
    report = merge_and_unload(lm.model)
    assert set(report.errors) == set(want)
    for p, (w, delta, kind, spec) in want.items():
        new = lm.model.get_submodule(p)
        assert new.kind == kind and new.spec() == spec, p  # same format and settings
        err = float((new.dense_weight() - (w + delta)).norm() / delta.norm())
        assert report.errors[p] == pytest.approx(err, rel=1e-4), p
        assert float((new.dense_weight() - w).norm()) > 0.5 * float(delta.norm()), p  # the update is in
    with torch.no_grad():
        merged = lm.model(ids)
    base = load_model(str(base_dir))
    quantize_(base.model, config_for_method(method, values))
    with torch.no_grad():
        without = base.model(ids)
    assert (merged - ref).norm() < 0.5 * (without - ref).norm()  # most of the update survives


def test_merge_refuses_bases_it_cannot_requantize(base_dir) -> None:  # type: ignore[no-untyped-def]
    from slimlm.quant.linear import W8A8Linear
    from slimlm.quant.primitives import quantize_weight

    lm = load_model(str(base_dir))
    attn = lm.model.model.layers[0].self_attn
    attn.q_proj = W8A8Linear.from_quantized(quantize_weight(attn.q_proj.weight, 8, -1, True))
    apply_peft(lm.model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights="random"))
    v_before = lm.model.model.layers[0].self_attn.v_proj.base_layer.weight.clone()
    with pytest.raises(SlimlmError, match="W8A8Linear base is not supported"):
        merge_and_unload(lm.model)
    assert len(adapter_modules(lm.model)) == 2 * lm.config.num_hidden_layers  # nothing changed
    assert torch.equal(lm.model.model.layers[0].self_attn.v_proj.base_layer.weight, v_before)


def test_bad_input_gets_one_clear_error(base_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(str(base_dir))
    with pytest.raises(ConfigError, match="linear names here: .*down_proj.*q_proj"):
        apply_peft(lm.model, LoraConfig(target_modules=["qproj"]))
    with pytest.raises(ConfigError, match="larger than the layer"):
        apply_peft(lm.model, LoraConfig(r=65, target_modules=["q_proj"]))
    assert not any(isinstance(m, LoraLinear) for m in lm.model.modules())  # nothing half-applied
    with pytest.raises(ConfigError, match="'r' must be >= 1"):
        LoraConfig(r=0)
    apply_peft(lm.model, LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(SlimlmError, match="already carries"):
        apply_peft(lm.model, LoraConfig(r=2, target_modules=["k_proj"]))
    save_adapter(lm.model, tmp_path / "adapter")
    other = tmp_path / "other"
    make_hf_model("llama", other, hidden_size=32, intermediate_size=64)
    wrong = load_model(str(other))
    with pytest.raises(CheckpointError, match="another base model"):
        load_adapter(wrong.model, tmp_path / "adapter")
    assert not any(isinstance(m, LoraLinear) for m in wrong.model.modules())
    with pytest.raises(CheckpointError, match="not an adapter folder"):
        load_adapter(wrong.model, tmp_path)


def test_qlora_step_under_bf16_autocast(base_dir) -> None:  # type: ignore[no-untyped-def]
    """QLoRA shape: NF4 base, fp32 adapters, bf16 autocast: every adapter gets an fp32 gradient, as
    close to the fp32 gradient of the de-quantized twin (plain linears holding the NF4 weights) as
    the twin's own bf16-autocast gradient is."""
    from slimlm.quant import quantize_
    from slimlm.quant.api import config_for_method

    lm = load_model(str(base_dir))
    quantize_(lm.model, config_for_method("nf4", {}))
    apply_peft(lm.model, LoraConfig(r=4, target_modules=ALL, init_lora_weights="random"))
    twin = load_model(str(base_dir))
    apply_peft(twin.model, LoraConfig(r=4, target_modules=ALL))
    with torch.no_grad():
        for m, t in zip(lm.model.modules(), twin.model.modules(), strict=True):
            if isinstance(m, LoraLinear):
                assert isinstance(t, LoraLinear) and isinstance(t.base_layer, nn.Linear)
                t.base_layer.weight.copy_(m.base_layer.dense_weight())
                t.lora_A.weight.copy_(m.lora_A.weight)
                t.lora_B.weight.copy_(m.lora_B.weight)
    ids = _data()

    def grads(model: nn.Module, bf16: bool) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = _loss(model, ids)
        loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}  # type: ignore[misc]

    ref, twin_bf16, qlora = grads(twin.model, False), grads(twin.model, True), grads(lm.model, True)
    assert qlora.keys() == ref.keys() and qlora
    err_q = sum(float((qlora[n] - g).norm()) for n, g in ref.items()) / sum(float(g.norm()) for g in ref.values())
    err_t = sum(float((twin_bf16[n] - g).norm()) for n, g in ref.items()) / sum(float(g.norm()) for g in ref.values())
    assert all(g.dtype == torch.float32 for g in qlora.values())
    assert err_q < 0.2 and err_q < 1.5 * err_t + 0.01, (err_q, err_t)  # a wrong backward gives ~1


def test_dora_trains_saves_and_merges(base_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    lm = load_model(str(base_dir))
    before = _base_state(lm.model)
    ids = _data()
    with torch.no_grad():
        base = lm.model(ids)
    apply_peft(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=ALL, use_dora=True))
    with torch.no_grad():
        assert torch.allclose(lm.model(ids), base, rtol=1e-5, atol=1e-5)  # m = ||W||, B = 0: the base model
    losses = _train(lm.model, steps=20)
    assert losses[-1] < 0.9 * losses[0], losses
    q = lm.model.model.layers[0].self_attn.q_proj
    assert not torch.allclose(q.lora_magnitude_vector, torch.linalg.norm(q.base_layer.weight, dim=1))
    for k, v in before.items():
        assert torch.equal(v, _base_state(lm.model)[k]), k
    check_save_load_and_merge(lm.model, base_dir, tmp_path / "dora")


def test_lora_plus_groups_give_b_its_own_learning_rate(base_dir) -> None:  # type: ignore[no-untyped-def]
    from slimlm.peft import lora_plus_param_groups

    lm = load_model(str(base_dir))
    with pytest.raises(ConfigError, match="LoRA adapters"):
        lora_plus_param_groups(lm.model, lr=1e-3)
    apply_peft(lm.model, LoraConfig(r=4, target_modules=ALL, use_dora=True))
    groups = lora_plus_param_groups(lm.model, lr=1e-3, lr_ratio=8)
    names = {id(p): n for n, p in lm.model.named_parameters()}
    a_side = {names[id(p)] for p in groups[0]["params"]}
    b_side = {names[id(p)] for p in groups[1]["params"]}
    trainable = {n for n, p in lm.model.named_parameters() if p.requires_grad}
    assert a_side | b_side == trainable and not a_side & b_side
    assert b_side == {n for n in trainable if n.endswith("lora_B.weight")}
    assert groups[0]["lr"] == 1e-3 and groups[1]["lr"] == pytest.approx(8e-3)
    losses = []
    opt = torch.optim.AdamW(groups)
    for _ in range(10):
        loss = _loss(lm.model, _data())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < losses[0]
