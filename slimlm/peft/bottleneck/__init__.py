"""Houlsby bottleneck adapters: config, module wrapper, apply, slimlm's adapter folder; registered as
``houlsby``."""

from slimlm.peft.bottleneck.config import HoulsbyConfig
from slimlm.peft.bottleneck.layer import HoulsbyLinear
from slimlm.peft.bottleneck.model import (
    SUFFIXES,
    apply_houlsby,
    build_houlsby,
    houlsby_from_peft_config,
    houlsby_to_peft_config,
)
from slimlm.peft.registry import PeftMethod, register_peft_method

register_peft_method(PeftMethod(
    name="houlsby", peft_type="SLIMLM_HOULSBY", config_cls=HoulsbyConfig, apply=apply_houlsby,
    from_peft_config=houlsby_from_peft_config, to_peft_config=houlsby_to_peft_config, key_suffixes=SUFFIXES,
    build=build_houlsby, additive=False))

__all__ = ["HoulsbyConfig", "HoulsbyLinear", "apply_houlsby"]
