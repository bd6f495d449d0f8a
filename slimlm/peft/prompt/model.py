"""Prompt tuning: a ``prompt_encoder`` submodule the runtime's forward puts before the tokens.

The model itself is untouched (no linear is wrapped): :class:`PromptEncoder` holds
``embedding: [P, hidden]`` and ``Transformer.forward`` prepends its rows on a fresh forward
(logits come back for P + T positions, as peft returns them). peft's file stores the rows as
``prompt_embeddings``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.peft.base import attach
from slimlm.peft.prompt.config import PromptTuningConfig
from slimlm.peft.registry import PeftReport
from slimlm.utils.errors import CheckpointError, ConfigError, SlimlmError


class PromptEncoder(nn.Module):
    def __init__(self, num_virtual_tokens: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_virtual_tokens, dim)  # [P, D]

    def virtual_tokens(self) -> torch.Tensor:
        """The virtual tokens' embeddings ``[P, D]`` (P-tuning computes them from its own encoder)."""
        return self.embedding.weight

    def forward(self, batch: int) -> torch.Tensor:
        # -> [B, P, D]
        return self.virtual_tokens().unsqueeze(0).expand(batch, -1, -1)


def _embed_tokens(model: nn.Module) -> nn.Embedding:
    emb = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not isinstance(emb, nn.Embedding):
        raise SlimlmError("prompt tuning needs a slimlm runtime model (lm.model)")
    return emb


def apply_prompt_tuning(model: nn.Module, cfg: PromptTuningConfig) -> PeftReport:
    if "prompt_encoder" in model._modules:
        raise SlimlmError("this model already has a prompt encoder: unload it first")
    emb = _embed_tokens(model)
    enc = PromptEncoder(cfg.num_virtual_tokens, emb.embedding_dim)
    with torch.no_grad():
        if cfg.prompt_tuning_init == "sample_vocab":
            ids = torch.randint(0, emb.num_embeddings, (cfg.num_virtual_tokens,))
            enc.embedding.weight.copy_(emb.weight[ids].float())
    attach(model, "prompt_encoder", enc)
    return PeftReport.of("prompt_tuning", ["prompt_encoder"], model)


def remove_prompt_encoder(model: nn.Module) -> bool:
    return model._modules.pop("prompt_encoder", None) is not None


def prompt_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    enc = model._modules.get("prompt_encoder")
    if not isinstance(enc, PromptEncoder):
        raise SlimlmError("this model has no prompt encoder to save")
    return {"prompt_embeddings": enc.virtual_tokens()}


def load_prompt(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: Any) -> list[str]:
    """The stored virtual tokens as a plain prompt encoder (P-tuning's too: peft stores the encoder's
    output and runs it in inference mode the same way)."""
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"a prompt-tuning adapter holds prompt_embeddings only, got {sorted(tensors)[:3]}")
    w = tensors["prompt_embeddings"]
    emb = _embed_tokens(model)
    if w.shape != (cfg.num_virtual_tokens, emb.embedding_dim):
        raise CheckpointError(f"prompt_embeddings {tuple(w.shape)} do not fit: expected [{cfg.num_virtual_tokens}, "
                              f"{emb.embedding_dim}]; is it an adapter for another base model?")
    apply_prompt_tuning(model, PromptTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens))
    with torch.no_grad():
        model.prompt_encoder.embedding.weight.copy_(w)  # type: ignore[union-attr, operator]
    return ["prompt_encoder"]


def prompt_to_peft_config(cfg: Any, model: nn.Module) -> dict[str, Any]:
    mc = getattr(model, "config", None)
    return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens,
            "token_dim": _embed_tokens(model).embedding_dim, "num_transformer_submodules": 1,
            "num_attention_heads": getattr(mc, "num_attention_heads", None),
            "num_layers": getattr(mc, "num_hidden_layers", None),
            "prompt_tuning_init": str(getattr(cfg, "prompt_tuning_init", "random")).upper(), "inference_mode": True}


def prompt_from_peft_config(d: dict[str, Any]) -> PromptTuningConfig:
    if int(d.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError("adapter_config.json: num_transformer_submodules must be 1 for a causal LM")
    init = str(d.get("prompt_tuning_init", "RANDOM")).lower()
    return PromptTuningConfig(num_virtual_tokens=int(d["num_virtual_tokens"]),
                              prompt_tuning_init=init if init in ("random", "sample_vocab") else "random")
