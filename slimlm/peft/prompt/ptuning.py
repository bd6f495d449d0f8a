"""P-tuning (Liu et al. 2021): virtual tokens produced by a small trainable encoder, peft's P_TUNING.

Training: ``embedding: [P, D]`` goes through peft's MLP reparameterization
(``Linear(D, H) -> ReLU -> Linear(H, H) -> ReLU -> Linear(H, D)``) and the output rows are put
before the tokens, as prompt tuning does. peft's file stores the encoder's *output* as
``prompt_embeddings`` (its inference mode reads those rows back without the MLP): slimlm saves and
loads the same, so a loaded P-tuning adapter is a plain prompt encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from slimlm.peft.base import attach
from slimlm.peft.prompt.model import PromptEncoder, _embed_tokens, prompt_to_peft_config
from slimlm.peft.registry import PeftReport
from slimlm.transforms import TransformConfig
from slimlm.utils.errors import ConfigError, SlimlmError


@dataclass
class PTuningConfig(TransformConfig):
    """P-tuning: ``num_virtual_tokens`` rows from an MLP encoder of width ``encoder_hidden_size``.

    Example::

        apply_peft(lm.model, PTuningConfig(num_virtual_tokens=8, encoder_hidden_size=128))
    """

    kind: ClassVar[str] = "p_tuning"
    family: ClassVar[str] = "peft"

    num_virtual_tokens: int = field(default=8, metadata={"help": "virtual tokens", "min": 1})
    encoder_hidden_size: int = field(default=128, metadata={"help": "width of the MLP encoder", "min": 1})
    encoder_reparameterization_type: str = field(default="MLP", metadata={"help": "MLP (LSTM is not supported)"})

    def validate(self) -> None:
        if self.encoder_reparameterization_type != "MLP":
            raise ConfigError(f"P-tuning encoder {self.encoder_reparameterization_type!r} is not supported (MLP only)")
        super().validate()


class PTuningEncoder(PromptEncoder):
    def __init__(self, num_virtual_tokens: int, dim: int, hidden: int) -> None:
        super().__init__(num_virtual_tokens, dim)
        self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                      nn.Linear(hidden, dim))

    def virtual_tokens(self) -> torch.Tensor:
        return self.mlp_head(self.embedding.weight)  # type: ignore[no-any-return]  # [P, D]


def apply_p_tuning(model: nn.Module, cfg: PTuningConfig) -> PeftReport:
    if "prompt_encoder" in model._modules:
        raise SlimlmError("this model already has a prompt encoder: unload it first")
    emb = _embed_tokens(model)
    enc = PTuningEncoder(cfg.num_virtual_tokens, emb.embedding_dim, cfg.encoder_hidden_size)
    with torch.no_grad():  # peft's embedding starts N(0, 1) (torch's default), the MLP as nn.Linear
        nn.init.normal_(enc.embedding.weight)
    attach(model, "prompt_encoder", enc)
    return PeftReport.of("p_tuning", ["prompt_encoder"], model)


def p_tuning_to_peft_config(cfg: PTuningConfig, model: nn.Module) -> dict[str, Any]:
    d = prompt_to_peft_config(cfg, model)  # type: ignore[arg-type]
    d.pop("prompt_tuning_init", None)
    d.update({"peft_type": "P_TUNING", "encoder_reparameterization_type": "MLP",
              "encoder_hidden_size": cfg.encoder_hidden_size, "encoder_num_layers": 2, "encoder_dropout": 0.0})
    return d


def p_tuning_from_peft_config(d: dict[str, Any]) -> PTuningConfig:
    if int(d.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError("adapter_config.json: num_transformer_submodules must be 1 for a causal LM")
    enc = str(d.get("encoder_reparameterization_type", "MLP"))
    return PTuningConfig(num_virtual_tokens=int(d["num_virtual_tokens"]),
                         encoder_hidden_size=int(d.get("encoder_hidden_size") or 128),
                         encoder_reparameterization_type=enc)
