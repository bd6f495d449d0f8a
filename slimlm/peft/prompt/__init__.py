"""Prompt tuning and P-tuning: configs, prompt encoders, peft format; registered as ``prompt_tuning``
and ``p_tuning``."""

from slimlm.peft.prompt.config import PromptTuningConfig
from slimlm.peft.prompt.model import (
    PromptEncoder,
    apply_prompt_tuning,
    load_prompt,
    prompt_from_peft_config,
    prompt_tensors,
    prompt_to_peft_config,
    remove_prompt_encoder,
)
from slimlm.peft.prompt.ptuning import (
    PTuningConfig,
    PTuningEncoder,
    apply_p_tuning,
    p_tuning_from_peft_config,
    p_tuning_to_peft_config,
)
from slimlm.peft.registry import PeftMethod, register_peft_method

register_peft_method(PeftMethod(
    name="prompt_tuning", peft_type="PROMPT_TUNING", config_cls=PromptTuningConfig, apply=apply_prompt_tuning,
    from_peft_config=prompt_from_peft_config, model_tensors=prompt_tensors, model_peft_config=prompt_to_peft_config,
    load_model_tensors=load_prompt, remove=remove_prompt_encoder, additive=False))
register_peft_method(PeftMethod(
    name="p_tuning", peft_type="P_TUNING", config_cls=PTuningConfig, apply=apply_p_tuning,
    from_peft_config=p_tuning_from_peft_config, model_tensors=prompt_tensors, model_peft_config=p_tuning_to_peft_config,
    load_model_tensors=load_prompt, remove=remove_prompt_encoder, additive=False))

__all__ = ["PTuningConfig", "PTuningEncoder", "PromptEncoder", "PromptTuningConfig", "apply_p_tuning",
           "apply_prompt_tuning"]
