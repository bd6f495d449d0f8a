"""Parameter-efficient fine-tuning on the slimlm runtime, in peft's adapter format.

One entry point per step, typed configs, methods registered once (``slimlm/peft/registry.py``)::

    from slimlm.loaders import load_model
    from slimlm.peft import LoraConfig, apply_peft, save_adapter, load_adapter, merge_and_unload

    lm = load_model("smollm2-135m")
    report = apply_peft(lm.model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    ...  # train: only the adapters require grad (a quantized base gets input gradients only)
    save_adapter(lm.model, "out/adapter")  # peft.PeftModel.from_pretrained(hf_model, "out/adapter") loads it
    merge_and_unload(lm.model)  # plain linears again, the update folded into their weights

Methods: ``lora`` (with rsLoRA scaling). Docs: docs/finetune.md; tests: tests/peft/.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from slimlm.peft import lora as _lora  # noqa: F401  (registers the method)
from slimlm.peft.adapter import load_adapter, lora_modules, save_adapter
from slimlm.peft.lora import LoraConfig, LoraLinear
from slimlm.peft.registry import PeftReport, method_for_config, peft_methods


def apply_peft(model: nn.Module, cfg: Any) -> PeftReport:
    """Apply the PEFT method whose config ``cfg`` is to ``model`` in place (base frozen)."""
    report = method_for_config(cfg).apply(model, cfg)
    model.peft_config = cfg  # type: ignore[assignment]
    return report


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward then skips the adapter); see :func:`unmerge_adapters`."""
    for m in lora_modules(model).values():
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for m in lora_modules(model).values():
        m.unmerge()


def unload(model: nn.Module, merge: bool = False) -> None:
    """Put the base linears back (``merge=True``: with the adapters folded in) and re-fuse q/k/v."""
    mods = lora_modules(model)
    if merge:
        for m in mods.values():
            m.check_mergeable()  # all or nothing: an unmergeable base raises before anything changes
        for m in mods.values():
            m.merge()
    for path, m in mods.items():
        if m.merged and not merge:
            m.unmerge()
        model.set_submodule(path, m.base_layer)
    model.__dict__.pop("peft_config", None)
    fuse = getattr(model, "fuse_projections_", None)
    if fuse is not None:
        fuse()


def merge_and_unload(model: nn.Module) -> None:
    unload(model, merge=True)


__all__ = ["LoraConfig", "LoraLinear", "PeftReport", "apply_peft", "load_adapter", "merge_adapters",
           "merge_and_unload", "peft_methods", "save_adapter", "unload", "unmerge_adapters"]
