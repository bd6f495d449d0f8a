"""slimlm's LoRA against the real ``peft`` package, both directions, on tiny random HF models.

slimlm -> peft: an adapter slimlm trained/initialized and saved loads with ``PeftModel.from_pretrained``
onto the transformers model of the same base and gives the same logits. peft -> slimlm: an adapter
peft wrote (``save_pretrained``) loads with ``slimlm.peft.load_adapter`` and gives peft's logits.

Run: ``.venv/bin/python -m pytest tests/peft/test_lora_peft_interop.py``
"""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.peft import LoraConfig, apply_peft, load_adapter, save_adapter
from tests.helpers.models import make_hf_model
from tests.helpers.peft_env import hide_old_gptqmodel

peft = pytest.importorskip("peft")


@pytest.fixture(autouse=True)
def _no_gptqmodel(monkeypatch: pytest.MonkeyPatch) -> None:
    """peft vs an old gptqmodel (tests/helpers/peft_env.py); these tests use no GPTQ layers."""
    hide_old_gptqmodel(monkeypatch.setattr)


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = 1e-4 * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol, f"max diff {(a - b).abs().max().item():.3e} > {tol:.3e}"


CASES = {
    # family: (slimlm targets, peft targets) — OPT's fc1/fc2/out_proj are up/down/o_proj in the runtime
    "llama": (["q_proj", "v_proj", "down_proj"], ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj"]),
    "qwen2": (["q_proj", "k_proj", "gate_proj"], ["v_proj", "down_proj"]),
    "opt": (["q_proj", "o_proj", "up_proj"], ["k_proj", "out_proj", "fc1", "fc2"]),
}


@pytest.mark.parametrize("family", sorted(CASES))
@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_slimlm_adapters(family: str, rslora: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = make_hf_model(family, tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=CASES[family][0], init_lora_weights="random", use_rslora=rslora)
    report = apply_peft(lm.model, cfg)
    assert len(report.targets) == 3 * lm.config.num_hidden_layers
    save_adapter(lm.model, tmp_path / "adapter", str(tmp_path / "base"))
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "LORA" and meta["use_rslora"] is rslora
    hf_leaf = {"o_proj": "out_proj", "up_proj": "fc1"} if family == "opt" else {}
    assert meta["target_modules"] == sorted(hf_leaf.get(t, t) for t in CASES[family][0])
    ids = torch.randint(0, 256, (2, 12))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    pm.eval()
    with torch.no_grad():
        ours, ref = lm.model(ids), pm(ids).logits
    _close(ours, ref)
    n_lora = sum(1 for n, _ in pm.named_modules() if n.endswith(".lora_A.default"))
    assert n_lora == len(report.targets)


def test_a_regex_target_stays_exact_in_peft(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Only layer 0's q_proj: adapter_config.json gets a regex of exact HF paths, peft wraps just that."""
    hf = make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    apply_peft(lm.model, LoraConfig(r=2, target_modules=r"model\.layers\.0\.self_attn\.q_proj", init_lora_weights="random"))
    save_adapter(lm.model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert isinstance(meta["target_modules"], str)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter"))
    assert [n for n, _ in pm.named_modules() if n.endswith(".lora_A.default")] == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default"]
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        _close(lm.model(ids), pm(ids).logits)


@pytest.mark.parametrize("family", sorted(CASES))
def test_slimlm_loads_peft_adapters(family: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = make_hf_model(family, tmp_path / "base")
    torch.manual_seed(1)
    pcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=CASES[family][1], init_lora_weights=False,
                           use_rslora=family == "llama", lora_dropout=0.1)
    pm = peft.get_peft_model(hf, pcfg)
    pm.save_pretrained(str(tmp_path / "adapter"))
    pm.eval()
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        ref = pm(ids).logits
    lm = load_model(str(tmp_path / "base"))
    paths = load_adapter(lm.model, tmp_path / "adapter")
    assert len(paths) == len(CASES[family][1]) * lm.config.num_hidden_layers
    lm.model.eval()
    with torch.no_grad():
        _close(lm.model(ids), ref)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_dora_both_ways(family: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """DoRA (magnitude x normalized direction): peft loads slimlm's, slimlm loads peft's, same logits."""
    hf = make_hf_model(family, tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    torch.manual_seed(0)
    apply_peft(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=CASES[family][0], init_lora_weights="random",
                                    use_dora=True))
    with torch.no_grad():  # move the magnitudes off their initial row norms
        for m in lm.model.modules():
            if hasattr(m, "lora_magnitude_vector"):
                m.lora_magnitude_vector.mul_(1 + 0.3 * torch.rand_like(m.lora_magnitude_vector))
    save_adapter(lm.model, tmp_path / "ours")
    ids = torch.randint(0, 256, (2, 11))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
    pm.eval()
    with torch.no_grad():
        _close(lm.model(ids), pm(ids).logits)
    hf2 = make_hf_model(family, tmp_path / "base2")
    pm2 = peft.get_peft_model(hf2, peft.LoraConfig(r=4, lora_alpha=16, target_modules=CASES[family][1],
                                                   init_lora_weights=False, use_dora=True))
    with torch.no_grad():
        for n, p in pm2.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    pm2.save_pretrained(str(tmp_path / "theirs"))
    pm2.eval()
    with torch.no_grad():
        ref = pm2(ids).logits
    lm2 = load_model(str(tmp_path / "base2"))
    load_adapter(lm2.model, tmp_path / "theirs")
    with torch.no_grad():
        _close(lm2.model(ids), ref)
