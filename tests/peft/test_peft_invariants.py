"""Invariants every registered PEFT method keeps, on a tiny Llama: a few optimizer steps lower the
loss on a fixed tiny dataset; the frozen base stays bit for bit; save -> load on a fresh base
reproduces the logits exactly; merge -> logits equal unmerged to 1e-5 (additive methods; the others
refuse to merge); unload restores the base's logits exactly. A method registered without a case here
fails ``test_every_registered_method_has_a_case``.

Run: ``.venv/bin/python -m pytest tests/peft/test_peft_invariants.py``
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from slimlm.loaders import load_model
from slimlm.peft import (
    HoulsbyConfig,
    IA3Config,
    LoraConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    PTuningConfig,
    load_adapter,
    merge_adapters,
    merge_and_unload,
    peft_methods,
    save_adapter,
    unload,
    unmerge_adapters,
)
from slimlm.transforms import TransformReport, apply_transform
from slimlm.utils.errors import SlimlmError
from tests.helpers.models import make_hf_model
from tests.peft.test_lora_invariants import ALL, _data, _train

# method -> (config, virtual tokens before the sequence in the logits, learning rate)
CASES: dict[str, Callable[[], tuple[Any, int, float]]] = {
    "lora": lambda: (LoraConfig(r=4, lora_alpha=8, target_modules=ALL), 0, 1e-2),
    "ia3": lambda: (IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                    0, 1e-1),
    "houlsby": lambda: (HoulsbyConfig(bottleneck_size=8), 0, 1e-2),
    "prompt_tuning": lambda: (PromptTuningConfig(num_virtual_tokens=4), 4, 1e-1),
    "p_tuning": lambda: (PTuningConfig(num_virtual_tokens=4, encoder_hidden_size=32), 4, 1e-2),
    "prefix_tuning": lambda: (PrefixTuningConfig(num_virtual_tokens=4), 0, 1e-1),
}
ADAPTER_KEYS = (".lora_", ".ia3_", ".adapter_", "prompt_encoder.", "prefix_encoder.")


def test_every_registered_method_has_a_case() -> None:
    assert set(CASES) == set(peft_methods())


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k.replace(".base_layer", ""): v.clone() for k, v in model.state_dict().items()
            if not any(a in k for a in ADAPTER_KEYS)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_method_invariants(name: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    make_hf_model("llama", tmp_path / "base")
    lm = load_model(str(tmp_path / "base"))
    ids = _data()
    with torch.no_grad():
        plain = lm.model(ids)
    before = _base_state(lm.model)
    cfg, skip, lr = CASES[name]()
    torch.manual_seed(0)
    report = apply_transform(lm.model, cfg)  # the one entry point of every transform
    assert isinstance(report, TransformReport) and report.method == name
    assert report.metrics["trainable_params"] == sum(p.numel() for p in lm.model.parameters() if p.requires_grad) > 0

    losses = _train(lm.model, steps=12, lr=lr, skip=skip)
    assert losses[-1] < losses[0] - 0.05 and losses[-1] < min(losses[:4]), losses  # float noise is ~1e-6
    after = _base_state(lm.model)
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(v, after[k]), k  # the frozen base, bit for bit

    save_adapter(lm.model, tmp_path / "adapter")
    with torch.no_grad():
        ref = lm.model(ids)
    fresh = load_model(str(tmp_path / "base"))
    load_adapter(fresh.model, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(fresh.model(ids), ref)  # save -> load: the same logits, bit for bit

    with torch.no_grad():
        if peft_methods()[name].additive:
            merge_adapters(lm.model)
            torch.testing.assert_close(lm.model(ids), ref, rtol=1e-5, atol=1e-5)
            unmerge_adapters(lm.model)
            torch.testing.assert_close(lm.model(ids), ref, rtol=1e-5, atol=1e-5)
            merge_and_unload(lm.model)
            torch.testing.assert_close(lm.model(ids), ref, rtol=1e-5, atol=1e-5)
        else:
            with pytest.raises(SlimlmError, match="cannot be merged"):
                merge_adapters(lm.model)
            with pytest.raises(SlimlmError, match="cannot be merged"):
                merge_and_unload(lm.model)
        unload(fresh.model)
        assert torch.equal(fresh.model(ids), plain)  # unload restores the base
        assert not any(p.requires_grad for n, p in fresh.model.named_parameters() if any(a in n for a in ADAPTER_KEYS))
