"""Checkpoint layout <-> runtime layout: Hugging Face parameter names per family.

``hf_to_runtime`` turns an HF state dict into runtime names (splitting GPT-2's fused, Conv1D-layout
``c_attn`` into q/k/v and transposing Conv1D weights); ``runtime_to_hf`` is its exact inverse, used
by the HF exporter. Both are pure functions over dicts of tensors.
"""

from __future__ import annotations

import re

import torch

from slimlm.models.config import ModelConfig
from slimlm.utils.errors import CheckpointError

# (HF pattern, runtime replacement) per family; applied to names after the family prefix is handled.
# Llama-style names shared by Llama and Gemma 3 (they differ only in their norms).
_DECODER = [
    (r"model\.embed_tokens\.", "model.embed_tokens."),
    (r"model\.norm\.", "model.norm."),
    (r"lm_head\.", "lm_head."),
    (r"model\.layers\.(\d+)\.input_layernorm\.", r"model.layers.\1.attn_norm."),
    (r"model\.layers\.(\d+)\.self_attn\.", r"model.layers.\1.self_attn."),
    (r"model\.layers\.(\d+)\.mlp\.", r"model.layers.\1.mlp."),
]
_LLAMA = _DECODER + [
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.mlp_norm."),
]
_GEMMA3 = _DECODER + [
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.", r"model.layers.\1.attn_post_norm."),
    (r"model\.layers\.(\d+)\.pre_feedforward_layernorm\.", r"model.layers.\1.mlp_norm."),
    (r"model\.layers\.(\d+)\.post_feedforward_layernorm\.", r"model.layers.\1.mlp_post_norm."),
]
_OPT = [
    (r"model\.decoder\.embed_tokens\.", "model.embed_tokens."),
    (r"model\.decoder\.embed_positions\.", "model.embed_positions."),
    (r"model\.decoder\.final_layer_norm\.", "model.norm."),
    (r"lm_head\.", "lm_head."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn\.", r"model.layers.\1.self_attn."),
    (r"model\.decoder\.layers\.(\d+)\.self_attn_layer_norm\.", r"model.layers.\1.attn_norm."),
    (r"model\.decoder\.layers\.(\d+)\.final_layer_norm\.", r"model.layers.\1.mlp_norm."),
    (r"model\.decoder\.layers\.(\d+)\.fc1\.", r"model.layers.\1.mlp.up_proj."),
    (r"model\.decoder\.layers\.(\d+)\.fc2\.", r"model.layers.\1.mlp.down_proj."),
]
_GPT2 = [
    (r"transformer\.wte\.", "model.embed_tokens."),
    (r"transformer\.wpe\.", "model.embed_positions."),
    (r"transformer\.ln_f\.", "model.norm."),
    (r"lm_head\.", "lm_head."),
    (r"transformer\.h\.(\d+)\.ln_1\.", r"model.layers.\1.attn_norm."),
    (r"transformer\.h\.(\d+)\.ln_2\.", r"model.layers.\1.mlp_norm."),
    (r"transformer\.h\.(\d+)\.attn\.c_proj\.", r"model.layers.\1.self_attn.o_proj."),
    (r"transformer\.h\.(\d+)\.mlp\.c_fc\.", r"model.layers.\1.mlp.up_proj."),
    (r"transformer\.h\.(\d+)\.mlp\.c_proj\.", r"model.layers.\1.mlp.down_proj."),
]
RULES = {"llama": _LLAMA, "gemma3": _GEMMA3, "opt": _OPT, "gpt2": _GPT2}
_IGNORED = re.compile(r"(\.attn\.bias$|\.attn\.masked_bias$|rotary_emb\.inv_freq$)")
_GPT2_CONV1D = re.compile(r"transformer\.h\.\d+\.(attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def _rename(name: str, rules: list[tuple[str, str]]) -> str | None:
    for pat, rep in rules:
        new, n = re.subn("^" + pat, rep, name)
        if n:
            return new
    return None


def hf_to_runtime(cfg: ModelConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map an HF-named state dict to runtime names; unknown tensors are an error (named)."""
    rules = RULES[cfg.family]
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if cfg.family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
            name = "transformer." + name  # GPT2Model checkpoints without the LM-head prefix
        if _IGNORED.search(name):
            continue
        if cfg.family == "gpt2":
            m = re.match(r"transformer\.h\.(\d+)\.attn\.c_attn\.(weight|bias)$", name)
            if m:
                i, kind = m.groups()
                w = t.t() if kind == "weight" else t  # Conv1D: [in, 3*out] -> [3*out, in]
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), w.split(cfg.hidden_size, dim=0), strict=True):
                    out[f"model.layers.{i}.self_attn.{proj}.{kind}"] = part.contiguous()
                continue
            if _GPT2_CONV1D.match(name):
                t = t.t().contiguous()
        new = _rename(name, rules)
        if new is None:
            raise CheckpointError(f"unexpected tensor {name!r} in a {cfg.architecture} checkpoint")
        out[new] = t
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return out


def _inverse_rules(rules: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Swap (HF regex, runtime replacement) into (runtime regex, HF replacement)."""
    inv = []
    for pat, rep in rules:
        rt_regex = re.escape(rep).replace(re.escape("\\1"), r"(\d+)")
        hf_rep = pat.replace(r"(\d+)", "\\1").replace("\\.", ".")
        inv.append((rt_regex, hf_rep))
    return inv


def runtime_to_hf(cfg: ModelConfig, tensors: dict[str, torch.Tensor], tied: bool | None = None) -> dict[str, torch.Tensor]:
    """Inverse of :func:`hf_to_runtime` (dense tensors under HF names, ready for safetensors).

    ``tied`` (default: the config's ``tie_word_embeddings``) drops ``lm_head.weight`` as the
    embedding's duplicate; pass False for a head that was swapped (e.g. quantized) and is its own.
    """
    inverse = _inverse_rules(RULES[cfg.family])
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    tied = cfg.tie_word_embeddings if tied is None else tied
    for name, t in tensors.items():
        if tied and name == "lm_head.weight":
            continue
        if cfg.family == "gpt2":
            m = re.match(r"model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", name)
            if m:
                pending.setdefault(f"{m.group(1)}.{m.group(3)}", {})[m.group(2)] = t
                continue
        new = _rename(name, inverse)
        if new is None:
            raise CheckpointError(f"cannot export runtime tensor {name!r} to {cfg.architecture}")
        if cfg.family == "gpt2" and _GPT2_CONV1D.match(new):
            t = t.t()
        out[new] = t.contiguous()
    for key, parts in pending.items():
        i, kind = key.split(".")
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.h.{i}.attn.c_attn.{kind}"] = (fused.t() if kind == "weight" else fused).contiguous()
    return out
