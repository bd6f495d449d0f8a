"""Houlsby bottleneck adapters against a reference on the transformers model: forward hooks on the HF
model's ``o_proj`` / ``down_proj`` add ``up(act(down(h)))`` to their output (the paper's placement:
after attention and after the MLP, before the residual add), with the same adapter weights.
Also: the registry refuses a second registration of a method.

Run: ``.venv/bin/python -m pytest tests/peft/test_houlsby.py``
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from slimlm.loaders import load_model
from slimlm.peft import (
    HoulsbyConfig,
    HoulsbyLinear,
    LoraConfig,
    adapter_modules,
    apply_peft,
    peft_methods,
    save_adapter,
)
from slimlm.peft.registry import register_peft_method
from slimlm.utils.errors import ConfigError, SlimlmError
from tests.helpers.models import make_hf_model


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_houlsby_equals_a_hooked_transformers_model(act: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    hf = make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    report = apply_peft(lm.model, HoulsbyConfig(bottleneck_size=8, non_linearity=act))
    assert sorted(report.targets) == [f"model.layers.{i}.{m}" for i in range(2) for m in ("mlp.down_proj", "self_attn.o_proj")]
    ids = torch.randint(0, 256, (2, 11))
    with torch.no_grad():
        hf_plain = hf(ids).logits
        torch.testing.assert_close(lm.model(ids), hf_plain, rtol=1e-4, atol=1e-4)  # up = 0: unchanged at the start
        for m in adapter_modules(lm.model).values():
            torch.nn.init.normal_(m.adapter_up.weight, std=0.2)
            torch.nn.init.normal_(m.adapter_up.bias, std=0.1)
            torch.nn.init.normal_(m.adapter_down.bias, std=0.1)
    fn = {"relu": F.relu, "gelu": F.gelu}[act]
    hooks = []
    for path, m in adapter_modules(lm.model).items():
        d_w, d_b = m.adapter_down.weight.detach(), m.adapter_down.bias.detach()
        u_w, u_b = m.adapter_up.weight.detach(), m.adapter_up.bias.detach()

        def hook(_mod, _inp, out, d_w=d_w, d_b=d_b, u_w=u_w, u_b=u_b):  # type: ignore[no-untyped-def]
            return out + (fn(out @ d_w.T + d_b) @ u_w.T + u_b)

        hooks.append(hf.get_submodule(path).register_forward_hook(hook))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = lm.model(ids)
    assert (ref - hf_plain).abs().max() > 1e-2  # the adapters do something
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)
    save_adapter(lm.model, tmp_path / "adapter")
    meta = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert meta["peft_type"] == "SLIMLM_HOULSBY" and meta["bottleneck_size"] == 8 and meta["non_linearity"] == act


def test_bad_input_and_duplicates(tmp_path) -> None:  # type: ignore[no-untyped-def]
    make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    with pytest.raises(ConfigError, match="non_linearity"):
        HoulsbyConfig(non_linearity="swish")
    with pytest.raises(ConfigError, match="wider than the layer"):
        apply_peft(lm.model, HoulsbyConfig(bottleneck_size=65))
    assert not any(isinstance(m, HoulsbyLinear) for m in lm.model.modules())
    apply_peft(lm.model, HoulsbyConfig(bottleneck_size=4))
    with pytest.raises(SlimlmError, match="already carries houlsby adapters"):
        apply_peft(lm.model, LoraConfig(r=2, target_modules=["q_proj"]))
    for method in peft_methods().values():
        with pytest.raises(ValueError, match="already registered"):
            register_peft_method(method)
