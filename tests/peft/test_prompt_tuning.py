"""Prompt tuning against peft (both directions) and its invariants.

peft runs the virtual tokens as ``inputs_embeds`` before the tokens and returns logits for all
P + T positions; the runtime's forward does the same with its ``prompt_encoder``.

Run: ``.venv/bin/python -m pytest tests/peft/test_prompt_tuning.py``
"""

from __future__ import annotations

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.peft import PromptTuningConfig, apply_peft, load_adapter, merge_and_unload, save_adapter, unload
from slimlm.utils.errors import CheckpointError, SlimlmError
from tests.helpers.models import make_hf_model
from tests.peft.test_lora_invariants import _base_state, _data, _loss
from tests.peft.test_lora_peft_interop import _close, _no_gptqmodel  # noqa: F401  (autouse fixture)

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family", ["llama", "gemma3", "opt"])  # plain, scaled embeddings, learned positions
def test_prompt_tuning_both_ways_with_peft(family: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = make_hf_model(family, tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    torch.manual_seed(0)
    apply_peft(lm.model, PromptTuningConfig(num_virtual_tokens=5))
    save_adapter(lm.model, tmp_path / "ours")
    ids = torch.randint(0, 256, (2, 9))
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
    pm.eval()
    with torch.no_grad():
        ours, ref = lm.model(ids), pm(input_ids=ids).logits
    assert ours.shape == ref.shape == (2, 14, 256)
    _close(ours, ref)
    hf2 = make_hf_model(family, tmp_path / "base2")
    torch.manual_seed(1)
    pm2 = peft.get_peft_model(hf2, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    pm2.save_pretrained(str(tmp_path / "theirs"))
    pm2.eval()
    with torch.no_grad():
        ref2 = pm2(input_ids=ids).logits
    lm2 = load_model(str(tmp_path / "base2"))
    load_adapter(lm2.model, tmp_path / "theirs")
    with torch.no_grad():
        _close(lm2.model(ids), ref2)


def test_prompt_tuning_invariants(tmp_path) -> None:  # type: ignore[no-untyped-def]
    make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    before = _base_state(lm.model)
    ids = _data()
    with torch.no_grad():
        plain = lm.model(ids)
    p = 6
    report = apply_peft(lm.model, PromptTuningConfig(num_virtual_tokens=p, prompt_tuning_init="sample_vocab"))
    assert report.trainable_params == p * lm.config.hidden_size
    opt = torch.optim.AdamW([t for t in lm.model.parameters() if t.requires_grad], lr=5e-2)
    losses = []
    for _ in range(25):
        loss = _loss(lambda x: lm.model(x)[:, p:], ids)  # the real tokens' logits
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.99 * losses[0], losses  # a few virtual tokens on random text: a small, steady drop
    for k, v in before.items():
        assert torch.equal(v, _base_state(lm.model)[k]), k
    with pytest.raises(SlimlmError, match="cannot be merged"):
        merge_and_unload(lm.model)
    save_adapter(lm.model, tmp_path / "pt")
    with torch.no_grad():
        ref = lm.model(ids)
    fresh = load_model(str(tmp_path / "base"))
    load_adapter(fresh.model, tmp_path / "pt")
    with torch.no_grad():
        assert torch.equal(fresh.model(ids), ref)
    other = tmp_path / "other"
    make_hf_model("llama", other, hidden_size=32, intermediate_size=64)
    wrong = load_model(str(other))
    with pytest.raises(CheckpointError, match="another base model"):
        load_adapter(wrong.model, tmp_path / "pt")
    unload(lm.model)
    with torch.no_grad():
        assert torch.equal(lm.model(ids), plain)
