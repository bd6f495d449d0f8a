"""Prefix tuning: config, prefix encoder + cache injection, peft format; registered as ``prefix_tuning``."""

from slimlm.peft.prefix.config import PrefixTuningConfig
from slimlm.peft.prefix.model import (
    PrefixCache,
    PrefixEncoder,
    apply_prefix_tuning,
    load_prefix,
    prefix_from_peft_config,
    prefix_tensors,
    prefix_to_peft_config,
    remove_prefix_encoder,
)
from slimlm.peft.registry import PeftMethod, register_peft_method

register_peft_method(PeftMethod(
    name="prefix_tuning", peft_type="PREFIX_TUNING", config_cls=PrefixTuningConfig, apply=apply_prefix_tuning,
    from_peft_config=prefix_from_peft_config, model_tensors=prefix_tensors, model_peft_config=prefix_to_peft_config,
    load_model_tensors=load_prefix, remove=remove_prefix_encoder, additive=False))

__all__ = ["PrefixCache", "PrefixEncoder", "PrefixTuningConfig", "apply_prefix_tuning"]
