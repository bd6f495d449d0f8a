"""Prefix tuning on the runtime: a ``prefix_encoder`` whose keys/values reach attention through the
runtime's cache object.

peft's layout (``PREFIX_TUNING``): one tensor ``prompt_embeddings: [P, layers * 2 * kv]`` with
``kv = num_kv_heads * head_dim``, read as ``[P, layers * 2, kv_heads, head_dim]``; row ``2 l`` is
layer l's keys, ``2 l + 1`` its values (no rotary applied to them, as transformers' cache holds them).

A forward pre-hook on the model hands the prefix to attention:

- a fresh forward (no ``cache``): :class:`PrefixCache`, an ``AttentionCache`` that puts the P keys
  and values before each layer's own (differentiable, so training reaches the prefix); its
  ``length`` P makes the runtime give the tokens positions P.. and a mask that sees the whole prefix;
- a :class:`slimlm.models.kv_cache.KVCache` still empty (generation): the prefix is written into it
  first, so prefill and every decode step attend to it;
- an ``attention_mask`` that covers the tokens but not the prefix gets P ones prepended (as peft does).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from slimlm.models.kv_cache import AttendFn, KVCache
from slimlm.peft.base import attach
from slimlm.peft.prefix.config import PrefixTuningConfig
from slimlm.peft.registry import PeftReport
from slimlm.utils.errors import CheckpointError, ConfigError, SlimlmError

_FORWARD_ARGS = ("positions", "cache", "attention_mask", "last_only")  # Transformer.forward after input_ids


class PrefixEncoder(nn.Module):
    def __init__(self, num_virtual_tokens: int, layers: int, kv_heads: int, head_dim: int,
                 projection: bool = False, hidden: int = 128) -> None:
        super().__init__()
        self.shape = (num_virtual_tokens, layers, kv_heads, head_dim)
        kv = kv_heads * head_dim
        out = layers * 2 * kv
        self.embedding = nn.Embedding(num_virtual_tokens, kv if projection else out)
        self.transform: nn.Module | None = (nn.Sequential(nn.Linear(kv, hidden), nn.Tanh(), nn.Linear(hidden, out))
                                            if projection else None)

    def values(self) -> torch.Tensor:
        """``[P, layers * 2 * kv]``: what peft's file stores."""
        e = self.embedding.weight
        return e if self.transform is None else self.transform(e)  # type: ignore[no-any-return]

    def kv(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[layers, B, kv_heads, P, head_dim]`` each."""
        p, layers, h, d = self.shape
        x = self.values().unsqueeze(0).expand(batch, -1, -1).reshape(batch, p, layers * 2, h, d)
        x = x.permute(2, 0, 3, 1, 4)  # [layers * 2, B, H, P, D]
        return x[0::2], x[1::2]


class PrefixCache:
    """The prefix as an attention cache for one fresh forward (nothing of the tokens is stored)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v  # [layers, B, H, P, D]
        self.length = k.shape[3]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool, attn: AttendFn) -> torch.Tensor:
        k = torch.cat([self.k[layer].to(k.dtype), k], 2)  # [B, H, P + T, D]
        v = torch.cat([self.v[layer].to(v.dtype), v], 2)
        return attn(q, k, v, mask, is_causal)

    def advance(self, t: int) -> None:
        """A fresh forward keeps nothing."""


def _inject(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    enc = model._modules.get("prefix_encoder")
    if not isinstance(enc, PrefixEncoder):
        return args, kwargs
    kwargs = dict(kwargs)
    for name, value in zip(_FORWARD_ARGS, args[1:], strict=False):
        kwargs[name] = value
    args = args[:1]
    ids = args[0] if args else kwargs["input_ids"]
    b, t = ids.shape
    p = enc.shape[0]
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs["cache"] = PrefixCache(*enc.kv(b))
    elif isinstance(cache, KVCache) and cache.length == 0:
        with torch.no_grad():
            k, v = enc.kv(b)
            for layer in range(k.shape[0]):
                cache.update(layer, k[layer], v[layer])
            cache.advance(p)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.shape[1] + p == cache.length + t:
        kwargs["attention_mask"] = torch.cat([mask.new_ones(b, p), mask], dim=1)
    return args, kwargs


def _dims(model: nn.Module) -> tuple[int, int, int]:
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "num_key_value_heads"):
        raise SlimlmError("prefix tuning needs a slimlm runtime model (lm.model)")
    return int(cfg.num_hidden_layers), int(cfg.num_key_value_heads), int(cfg.head_dim)


def apply_prefix_tuning(model: nn.Module, cfg: PrefixTuningConfig) -> PeftReport:
    if "prefix_encoder" in model._modules:
        raise SlimlmError("this model already has a prefix encoder: unload it first")
    enc = PrefixEncoder(cfg.num_virtual_tokens, *_dims(model), cfg.prefix_projection, cfg.encoder_hidden_size)
    attach(model, "prefix_encoder", enc)
    enc.__dict__["_hook"] = model.register_forward_pre_hook(_inject, with_kwargs=True)
    return PeftReport.of("prefix_tuning", ["prefix_encoder"], model)


def remove_prefix_encoder(model: nn.Module) -> bool:
    enc = model._modules.pop("prefix_encoder", None)
    if enc is None:
        return False
    enc.__dict__["_hook"].remove()
    return True


def prefix_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    enc = model._modules.get("prefix_encoder")
    if not isinstance(enc, PrefixEncoder):
        raise SlimlmError("this model has no prefix encoder to save")
    return {"prompt_embeddings": enc.values()}


def load_prefix(model: nn.Module, tensors: dict[str, torch.Tensor], cfg: PrefixTuningConfig) -> list[str]:
    """The stored keys/values as a plain (projection-free) prefix, as peft's inference mode runs them."""
    if set(tensors) != {"prompt_embeddings"}:
        raise CheckpointError(f"a prefix-tuning adapter holds prompt_embeddings only, got {sorted(tensors)[:3]}")
    w = tensors["prompt_embeddings"]
    layers, h, d = _dims(model)
    if w.shape != (cfg.num_virtual_tokens, layers * 2 * h * d):
        raise CheckpointError(f"prompt_embeddings {tuple(w.shape)} do not fit: expected [{cfg.num_virtual_tokens}, "
                              f"{layers * 2 * h * d}] (layers x 2 x kv heads x head dim); is it an adapter for "
                              "another base model?")
    apply_prefix_tuning(model, PrefixTuningConfig(num_virtual_tokens=cfg.num_virtual_tokens))
    with torch.no_grad():
        model.prefix_encoder.embedding.weight.copy_(w)  # type: ignore[union-attr, operator]
    return ["prefix_encoder"]


def prefix_to_peft_config(cfg: PrefixTuningConfig, model: nn.Module) -> dict[str, Any]:
    layers, h, d = _dims(model)
    return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": cfg.num_virtual_tokens,
            "token_dim": h * d, "num_transformer_submodules": 1, "num_attention_heads": h, "num_layers": layers,
            "encoder_hidden_size": cfg.encoder_hidden_size, "prefix_projection": cfg.prefix_projection,
            "inference_mode": True}


def prefix_from_peft_config(d: dict[str, Any]) -> PrefixTuningConfig:
    if int(d.get("num_transformer_submodules") or 1) != 1:
        raise ConfigError("adapter_config.json: num_transformer_submodules must be 1 for a causal LM")
    return PrefixTuningConfig(num_virtual_tokens=int(d["num_virtual_tokens"]),
                              prefix_projection=bool(d.get("prefix_projection", False)),
                              encoder_hidden_size=int(d.get("encoder_hidden_size") or 128))
