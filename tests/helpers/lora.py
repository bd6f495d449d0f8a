"""Peft-written LoRA adapters on a tiny HF base, and peft's own greedy tokens for them (the oracle of
the multi-LoRA serving tests in tests/engine and tests/server)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tests.helpers.peft_env import hide_old_gptqmodel

# name -> peft LoraConfig fields: different ranks, targets and scalings (one rsLoRA)
ADAPTERS: dict[str, dict[str, Any]] = {
    "sql": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "chat": dict(r=2, lora_alpha=6, target_modules=["k_proj", "o_proj", "gate_proj", "up_proj"], use_rslora=True),
}


def write_peft_adapters(base: Path, out: Path, names: Sequence[str] = tuple(ADAPTERS), seed: int = 1) -> dict[str, Path]:
    """Each adapter made by ``peft.get_peft_model`` (random B, so it changes the output) and saved by
    peft's ``save_pretrained`` next to ``out``; returns name -> folder."""
    import peft
    from transformers import AutoModelForCausalLM

    hide_old_gptqmodel()
    folders = {}
    for i, name in enumerate(names):
        hf = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
        torch.manual_seed(seed + i)
        pm = peft.get_peft_model(hf, peft.LoraConfig(init_lora_weights=False, **ADAPTERS[name]))
        with torch.no_grad():  # larger updates: each adapter's greedy tokens differ from the base's
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(4.0)
        pm.save_pretrained(str(out / name))
        folders[name] = out / name
    return folders


def peft_greedy(base: Path, adapter: Path | None, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """Greedy tokens of transformers' model of ``base`` with peft's ``PeftModel`` of ``adapter`` (None:
    the base alone), full recompute each token (no cache), ``n`` tokens per prompt."""
    import peft
    from transformers import AutoModelForCausalLM

    hide_old_gptqmodel()
    model: Any = AutoModelForCausalLM.from_pretrained(str(base), torch_dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter))
    model.eval()
    outs = []
    with torch.no_grad():
        for p in prompts:
            ids = list(p)
            for _ in range(n):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            outs.append(ids[len(p):])
    return outs
