"""LoRA (with rsLoRA and DoRA): config, module wrapper, apply, peft format; registered as ``lora``."""

from slimlm.peft.lora.config import LoraConfig
from slimlm.peft.lora.layer import LoraLinear
from slimlm.peft.lora.model import (
    apply_lora,
    build_lora,
    lora_from_peft_config,
    lora_plus_param_groups,
    lora_to_peft_config,
)
from slimlm.peft.registry import PeftMethod, register_peft_method

register_peft_method(PeftMethod(
    name="lora", peft_type="LORA", config_cls=LoraConfig, apply=apply_lora, from_peft_config=lora_from_peft_config,
    to_peft_config=lora_to_peft_config, key_suffixes=("lora_A.weight", "lora_B.weight", "lora_magnitude_vector"),
    build=build_lora))

__all__ = ["LoraConfig", "LoraLinear", "apply_lora", "lora_plus_param_groups"]
