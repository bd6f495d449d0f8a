"""IA3: config, module wrapper, apply, peft format; registered as ``ia3``."""

from slimlm.peft.ia3.config import IA3Config
from slimlm.peft.ia3.layer import IA3Linear
from slimlm.peft.ia3.model import apply_ia3, build_ia3, ia3_from_peft_config, ia3_to_peft_config
from slimlm.peft.registry import PeftMethod, register_peft_method

register_peft_method(PeftMethod(
    name="ia3", peft_type="IA3", config_cls=IA3Config, apply=apply_ia3, from_peft_config=ia3_from_peft_config,
    to_peft_config=ia3_to_peft_config, key_suffixes=("ia3_l",), build=build_ia3))

__all__ = ["IA3Config", "IA3Linear", "apply_ia3"]
