"""Parameter-efficient fine-tuning on the slimlm runtime, in peft's adapter format.

One entry point per step, typed configs, methods registered once (``slimlm/peft/registry.py``)::

    from slimlm.loaders import load_model
    from slimlm.peft import LoraConfig, apply_peft, save_adapter, load_adapter, merge_and_unload

    lm = load_model("smollm2-135m")
    report = apply_peft(lm.model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"]))
    ...  # train: only the adapters require grad (a quantized base gets input gradients only)
    save_adapter(lm.model, "out/adapter")  # peft.PeftModel.from_pretrained(hf_model, "out/adapter") loads it
    merge_and_unload(lm.model)  # plain linears again, the update folded into their weights

Methods: ``lora`` (rsLoRA scaling, DoRA, PiSSA and LoftQ inits, LoRA+ groups), ``ia3``, ``houlsby``
(bottleneck adapters, slimlm's own format), ``prompt_tuning``, ``p_tuning``, ``prefix_tuning``. Docs: docs/finetune.md; tests: tests/peft/.
"""

from __future__ import annotations

from torch import nn

from slimlm.peft import bottleneck as _bottleneck  # noqa: F401  (registers the method)
from slimlm.peft import ia3 as _ia3  # noqa: F401  (registers the method)
from slimlm.peft import lora as _lora  # noqa: F401  (registers the method)
from slimlm.peft import prefix as _prefix  # noqa: F401  (registers the method)
from slimlm.peft import prompt as _prompt  # noqa: F401  (registers the methods)
from slimlm.peft.adapter import load_adapter, save_adapter
from slimlm.peft.base import AdapterLayer, adapter_modules
from slimlm.peft.bottleneck import HoulsbyConfig, HoulsbyLinear
from slimlm.peft.ia3 import IA3Config, IA3Linear
from slimlm.peft.lora import LoraConfig, LoraLinear, lora_plus_param_groups
from slimlm.peft.lora.merge import MergeReport, check_mergeable, merged_base
from slimlm.peft.multi import adapter_batch, adapter_names, add_adapter, forward_with_adapters, set_adapter
from slimlm.peft.prefix import PrefixTuningConfig
from slimlm.peft.prompt import PromptTuningConfig, PTuningConfig
from slimlm.peft.registry import PeftReport, apply_peft, method_for_config, peft_methods
from slimlm.utils.errors import SlimlmError


def _additive(model: nn.Module) -> None:
    cfg = getattr(model, "peft_config", None)
    if cfg is not None and not method_for_config(cfg).additive:
        raise SlimlmError(f"{cfg.kind} adds modules or tokens, not a weight update: it cannot be merged (unload instead)")


def merge_adapters(model: nn.Module) -> None:
    """Fold every adapter into its base weight (forward then skips the adapter); see :func:`unmerge_adapters`."""
    _additive(model)
    for m in adapter_modules(model).values():
        m.merge()


def unmerge_adapters(model: nn.Module) -> None:
    for m in adapter_modules(model).values():
        m.unmerge()


def unload(model: nn.Module) -> None:
    """Put the base linears back without the adapters' update and re-fuse q/k/v for inference."""
    for path, m in adapter_modules(model).items():
        m.unmerge()
        model.set_submodule(path, m.base_layer)
    for method in peft_methods().values():
        if method.remove is not None:  # model-level modules (prompt encoder)
            method.remove(model)
    _done(model)


def merge_and_unload(model: nn.Module) -> MergeReport:
    """Fold every adapter into its base and put the bases back: plain weights in place, weight-only
    quantized bases de-quantized, merged and re-quantized in their own format (the report says how
    much of each update the re-quantization lost). All or nothing: an unmergeable base raises first."""
    _additive(model)
    mods = adapter_modules(model)
    for m in mods.values():
        check_mergeable(m.base_layer)
    report = MergeReport()
    for path, m in mods.items():
        if m.merged:  # already folded in place (a plain base)
            new, err = m.base_layer, 0.0
        else:
            new, err = merged_base(m)
        model.set_submodule(path, new)
        report.errors[path] = err
    _done(model)
    return report


def _done(model: nn.Module) -> None:
    model.__dict__.pop("peft_config", None)
    model.__dict__.pop("peft_adapters", None)
    for handle in model.__dict__.pop("_adapter_names_hook", ()):
        handle.remove()
    fuse = getattr(model, "fuse_projections_", None)
    if fuse is not None:
        fuse()


__all__ = ["AdapterLayer", "HoulsbyConfig", "HoulsbyLinear", "IA3Config", "IA3Linear", "LoraConfig", "LoraLinear",
           "MergeReport", "PTuningConfig", "PeftReport", "PrefixTuningConfig", "PromptTuningConfig", "apply_peft", "lora_plus_param_groups", "load_adapter", "merge_adapters",
           "adapter_batch", "adapter_modules", "adapter_names", "add_adapter", "forward_with_adapters", "merge_and_unload",
           "set_adapter", "peft_methods", "save_adapter", "unload", "unmerge_adapters"]
