"""Several LoRA adapters resident at once: a mixed batch gives each row the logits of its adapter
alone (each oracle a fresh model carrying only that adapter; one adapter written by peft, checked
against peft's own logits), set_adapter switches every call, bad names get one clear error.

Run: ``.venv/bin/python -m pytest tests/peft/test_multi_adapter.py``
"""

from __future__ import annotations

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.peft import (
    LoraConfig,
    adapter_names,
    add_adapter,
    apply_peft,
    forward_with_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    set_adapter,
)
from slimlm.utils.errors import ConfigError, SlimlmError
from tests.helpers.models import make_hf_model
from tests.peft.test_lora_peft_interop import _close, _no_gptqmodel  # noqa: F401  (autouse fixture)

peft = pytest.importorskip("peft")


def test_mixed_batch_rows_get_their_own_adapter(tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = make_hf_model("llama", tmp_path / "base")
    torch.manual_seed(1)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"],
                                                 init_lora_weights=False))
    pm.save_pretrained(str(tmp_path / "sql"))
    pm.eval()
    ids = torch.randint(0, 256, (4, 10))
    with torch.no_grad():
        peft_sql = pm(ids).logits

    lm = load_model(str(tmp_path / "base"))
    torch.manual_seed(0)
    apply_peft(lm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights="random"))
    assert load_adapter(lm.model, tmp_path / "sql", adapter_name="sql") == [
        f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.q_proj")]
    add_adapter(lm.model, "chat", LoraConfig(r=3, lora_alpha=6, target_modules=["v_proj"], init_lora_weights="random"))
    assert adapter_names(lm.model) == ["default", "sql", "chat"]
    save_adapter(lm.model, tmp_path / "default")
    save_adapter(lm.model, tmp_path / "chat", adapter_name="chat")

    alone = {}
    for name in ("default", "sql", "chat", "__base__"):
        m = load_model(str(tmp_path / "base"))
        if name != "__base__":
            load_adapter(m.model, tmp_path / name)
        with torch.no_grad():
            alone[name] = m.model(ids)
    _close(alone["sql"], peft_sql)  # the peft-written adapter alone is peft's model
    rows = ["sql", "__base__", "chat", "default"]
    with torch.no_grad():
        mixed = forward_with_adapters(lm.model, ids, rows)
        for i, name in enumerate(rows):
            torch.testing.assert_close(mixed[i], alone[name][i], rtol=1e-5, atol=1e-5)
        assert torch.equal(lm.model(ids, adapter_names=rows), mixed)  # peft's keyword on the forward
        assert torch.equal(lm.model(ids), alone["default"])  # outside the call: the active adapter
        set_adapter(lm.model, "chat")
        torch.testing.assert_close(lm.model(ids), alone["chat"], rtol=1e-5, atol=1e-5)
        set_adapter(lm.model, "default")

    with pytest.raises(ConfigError, match="unknown adapter 'nope'"):
        forward_with_adapters(lm.model, ids, ["nope", "sql", "sql", "sql"])
    with pytest.raises(ConfigError, match="3 entries for a batch of 4"):
        forward_with_adapters(lm.model, ids, ["sql"] * 3)
    with pytest.raises(SlimlmError, match="already resident"):
        add_adapter(lm.model, "chat", LoraConfig(r=2, target_modules=["v_proj"]))
    with pytest.raises(ConfigError, match="match no linear"):
        add_adapter(lm.model, "mlp", LoraConfig(r=2, target_modules=["gate_proj"]))  # not wrapped by default
    merge_adapters(lm.model)
    with pytest.raises(SlimlmError, match="unmerge it"):
        set_adapter(lm.model, "sql")
