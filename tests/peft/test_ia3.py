"""IA3 against peft (both directions) and its invariants (training, save -> load, merge, base untouched).

Run: ``.venv/bin/python -m pytest tests/peft/test_ia3.py``
"""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.peft import (
    IA3Config,
    IA3Linear,
    apply_peft,
    load_adapter,
    save_adapter,
)
from tests.helpers.models import make_hf_model
from tests.peft.test_lora_invariants import _base_state, _data, _train, check_save_load_and_merge
from tests.peft.test_lora_peft_interop import _close, _no_gptqmodel  # noqa: F401  (autouse fixture)

peft = pytest.importorskip("peft")

TARGETS = {  # family: (targets, feed-forward ones), runtime names / HF names
    "llama": ((["k_proj", "v_proj", "down_proj"], ["down_proj"]), (["q_proj", "v_proj", "up_proj"], ["up_proj"])),
    "opt": ((["k_proj", "v_proj", "down_proj"], ["down_proj"]), (["q_proj", "out_proj", "fc2"], ["fc2"])),
}


@pytest.mark.parametrize("family", sorted(TARGETS))
def test_ia3_both_ways_with_peft(family: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = make_hf_model(family, tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    (tg, ff), (ptg, pff) = TARGETS[family]
    torch.manual_seed(0)
    apply_peft(lm.model, IA3Config(target_modules=tg, feedforward_modules=ff, init_ia3_weights=False))
    save_adapter(lm.model, tmp_path / "ours")
    meta = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "IA3" and meta["feedforward_modules"] == [{"down_proj": "fc2"}.get(ff[0], ff[0])
                                                                          if family == "opt" else ff[0]]
    ids = torch.randint(0, 256, (2, 10))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
    pm.eval()
    with torch.no_grad():
        _close(lm.model(ids), pm(ids).logits)
    hf2 = make_hf_model(family, tmp_path / "base2")
    torch.manual_seed(1)
    pm2 = peft.get_peft_model(hf2, peft.IA3Config(target_modules=ptg, feedforward_modules=pff, init_ia3_weights=False))
    pm2.save_pretrained(str(tmp_path / "theirs"))
    pm2.eval()
    with torch.no_grad():
        ref = pm2(ids).logits
    lm2 = load_model(str(tmp_path / "base2"))
    paths = load_adapter(lm2.model, tmp_path / "theirs")
    assert len(paths) == 3 * lm2.config.num_hidden_layers
    ffs = [p for p in paths if lm2.model.get_submodule(p).is_feedforward]
    assert len(ffs) == lm2.config.num_hidden_layers
    with torch.no_grad():
        _close(lm2.model(ids), ref)


@pytest.mark.parametrize("family", ["llama", "opt"])  # opt: biases get rescaled on merge
def test_ia3_invariants(family: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    make_hf_model(family, tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    before = _base_state(lm.model)
    ids = _data()
    with torch.no_grad():
        base = lm.model(ids)
    report = apply_peft(lm.model, IA3Config())
    assert all(isinstance(lm.model.get_submodule(p), IA3Linear) for p in report.targets)
    with torch.no_grad():
        assert torch.equal(lm.model(ids), base)  # vectors start at 1
    losses = _train(lm.model, steps=25, lr=0.2)  # one vector per layer: slow to move, large steps
    assert losses[-1] < 0.97 * losses[0], losses
    for k, v in before.items():
        assert torch.equal(v, _base_state(lm.model)[k]), k
    check_save_load_and_merge(lm.model, tmp_path / "base", tmp_path / "ia3")
