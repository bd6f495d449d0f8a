"""Prefix tuning and P-tuning against peft, both directions, on tiny random HF models.

Prefix tuning: the P keys/values reach every layer's attention through the runtime's cache object
(a fresh forward and generation through a ``KVCache``); peft injects them as transformers'
``past_key_values``. P-tuning: peft stores the MLP encoder's output rows, which slimlm saves and loads.

Run: ``.venv/bin/python -m pytest tests/peft/test_prefix_ptuning.py``
"""

from __future__ import annotations

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.models.kv_cache import KVCache
from slimlm.peft import PrefixTuningConfig, PTuningConfig, apply_peft, load_adapter, save_adapter
from slimlm.utils.errors import CheckpointError
from tests.helpers.models import make_hf_model
from tests.peft.test_lora_invariants import _data, _train
from tests.peft.test_lora_peft_interop import _close, _no_gptqmodel  # noqa: F401  (autouse fixture)

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # GQA (kv heads < heads), qkv bias + tied head
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_both_ways_with_peft(family: str, projection: bool, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = make_hf_model(family, tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    torch.manual_seed(0)
    apply_peft(lm.model, PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=projection, encoder_hidden_size=32))
    _train(lm.model, steps=3)  # move it off its init through the differentiable cache path
    save_adapter(lm.model, tmp_path / "ours")
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
    pm.eval()
    with torch.no_grad():
        ours = lm.model(ids)
        ref = pm(input_ids=ids, attention_mask=mask).logits
        assert ours.shape == ref.shape == (2, 9, 256)
        _close(ours, ref)
        _close(lm.model(ids, attention_mask=mask), ref)
        cache = KVCache.for_model(lm.config, 2, 5 + 12, torch.float32)  # generation: the prefix fills the cache
        pre = lm.model(ids[:, :6], cache=cache)
        step = lm.model(ids[:, 6:7], cache=cache)
        _close(torch.cat([pre, step], 1), ref[:, :7])
    hf2 = make_hf_model(family, tmp_path / "base2")
    torch.manual_seed(1)
    pm2 = peft.get_peft_model(hf2, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                           prefix_projection=projection, encoder_hidden_size=32))
    pm2.save_pretrained(str(tmp_path / "theirs"))
    pm2.eval()
    with torch.no_grad():
        ref2 = pm2(input_ids=ids, attention_mask=mask).logits
    lm2 = load_model(str(tmp_path / "base2"))
    load_adapter(lm2.model, tmp_path / "theirs")
    with torch.no_grad():
        _close(lm2.model(ids), ref2)
    make_hf_model("llama", tmp_path / "wide", hidden_size=32, intermediate_size=64)
    wrong = load_model(str(tmp_path / "wide"))
    with pytest.raises(CheckpointError, match="another base model"):
        load_adapter(wrong.model, tmp_path / "ours")


def test_p_tuning_both_ways_with_peft(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    torch.manual_seed(0)
    apply_peft(lm.model, PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=32))
    assert any("mlp_head" in n for n, p in lm.model.named_parameters() if p.requires_grad)
    _train(lm.model, steps=3, skip=4)
    save_adapter(lm.model, tmp_path / "ours")
    ids = _data()
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "ours"))
    pm.eval()
    with torch.no_grad():
        ours = lm.model(ids)
        _close(ours, pm(input_ids=ids).logits)
    hf2 = make_hf_model("llama", tmp_path / "base2")
    pm2 = peft.get_peft_model(hf2, peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=3,
                                                            encoder_hidden_size=32))
    pm2.save_pretrained(str(tmp_path / "theirs"))
    pm2.eval()
    with torch.no_grad():
        ref2 = pm2(input_ids=ids).logits
    lm2 = load_model(str(tmp_path / "base2"))
    load_adapter(lm2.model, tmp_path / "theirs")
    with torch.no_grad():
        _close(lm2.model(ids), ref2)
