"""Runtime model configuration, derived from a Hugging Face ``config.json`` dict.

One dataclass describes every supported family (Llama/Mistral/Qwen2/SmolLM, Gemma 3, GPT-2, OPT):
the differences are switches (norm type, activation, gated MLP, biases, q/k norm, sandwich norms,
learned positions, sliding-window layers, RoPE variant). ``hf_config`` keeps the original dict so
export writes back exactly what transformers expects, with structural edits (pruned heads/layers)
applied by :meth:`ModelConfig.to_hf_config`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from slimlm.utils.errors import CheckpointError, SlimlmError

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "Gemma3ForCausalLM": "gemma3",
    "GPT2LMHeadModel": "gpt2",
    "OPTForCausalLM": "opt",
}
_MODEL_TYPE_TO_ARCH = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "opt": "OPTForCausalLM",
}


@dataclass
class ModelConfig:
    family: str  # "llama" | "gemma3" | "gpt2" | "opt"
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    norm: str = "rms"  # "rms" | "layer"
    norm_eps: float = 1e-6
    norm_offset: float = 0.0  # Gemma's (1 + w) RMSNorm
    act: str = "silu"  # silu | gelu_tanh | gelu | relu
    gated_mlp: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    norm_bias: bool = False
    qk_norm: bool = False
    sandwich_norms: bool = False  # Gemma: post-attention and post-MLP norms
    rope: dict[str, Any] | None = None  # {"rope_type", "rope_theta", ...} for global layers
    rope_local: dict[str, Any] | None = None  # Gemma 3 sliding layers
    layer_types: list[str] = field(default_factory=list)  # "full_attention" | "sliding_attention"
    sliding_window: int | None = None
    attn_scale: float | None = None  # None -> head_dim ** -0.5
    embed_scale: float = 1.0
    learned_pos: bool = False
    pos_offset: int = 0  # OPT's learned positions start at index 2
    tie_word_embeddings: bool = False
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    hf_config: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def check_positions(self, n: int, what: str) -> None:
        """Refuse ``n`` positions beyond a learned position table (GPT-2/OPT), in one line, before work starts."""
        if self.learned_pos and n > self.max_position_embeddings:
            raise SlimlmError(f"{what} {n} exceeds the model's context of {self.max_position_embeddings} positions "
                              "(its position embeddings are learned, there are no more)")

    def is_sliding(self, layer_idx: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer_idx] == "sliding_attention"

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def from_hf(hf: dict[str, Any]) -> ModelConfig:
        """Map an HF config dict to the runtime config; unsupported architectures fail clearly."""
        hf = copy.deepcopy(hf)
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else _MODEL_TYPE_TO_ARCH.get(hf.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            name = arch or hf.get("model_type") or "<none>"
            raise CheckpointError(
                f"unsupported architecture {name!r}; supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        builder = {"llama": _llama, "gemma3": _gemma3, "gpt2": _gpt2, "opt": _opt}[family]
        try:
            cfg = builder(hf, arch)
        except KeyError as e:
            raise CheckpointError(f"config.json for {arch} lacks required key {e.args[0]!r}") from None
        cfg.hf_config = hf
        if cfg.num_attention_heads % cfg.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads {cfg.num_attention_heads} not divisible by num_key_value_heads {cfg.num_key_value_heads}"
            )
        return cfg

    def to_hf_config(self) -> dict[str, Any]:
        """The HF config dict, with this config's (possibly edited) structure written back."""
        hf = copy.deepcopy(self.hf_config)
        if self.family == "gpt2":
            hf.update(n_layer=self.num_hidden_layers, n_head=self.num_attention_heads, n_embd=self.hidden_size,
                      vocab_size=self.vocab_size)
            if hf.get("n_inner") is not None or self.intermediate_size != 4 * self.hidden_size:
                hf["n_inner"] = self.intermediate_size
        elif self.family == "opt":
            hf.update(num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                      hidden_size=self.hidden_size, ffn_dim=self.intermediate_size, vocab_size=self.vocab_size)
        else:
            hf.update(num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                      num_key_value_heads=self.num_key_value_heads, intermediate_size=self.intermediate_size,
                      hidden_size=self.hidden_size, vocab_size=self.vocab_size, head_dim=self.head_dim)
            if "layer_types" in hf or self.family == "gemma3":
                hf["layer_types"] = list(self.layer_types)
        hf["tie_word_embeddings"] = self.tie_word_embeddings
        hf.setdefault("architectures", [self.architecture])
        hf.setdefault("model_type", self.model_type)
        return hf


def _rope_params(hf: dict[str, Any], key: str | None = None) -> dict[str, Any]:
    """Normalize transformers 4.x (rope_theta + rope_scaling) and 5.x (rope_parameters) layouts."""
    rp = hf.get("rope_parameters")
    if isinstance(rp, dict) and key is not None and key in rp:
        rp = rp[key]
    if isinstance(rp, dict) and ("rope_theta" in rp or "rope_type" in rp):
        out = dict(rp)
    else:
        out = dict(hf.get("rope_scaling") or {})
        out["rope_theta"] = hf.get("rope_theta", 10000.0)
    if "type" in out and "rope_type" not in out:
        out["rope_type"] = out.pop("type")
    out.setdefault("rope_type", "default")
    out.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    out["max_position_embeddings"] = hf.get("max_position_embeddings", 2048)
    return out


def _llama(hf: dict[str, Any], arch: str) -> ModelConfig:
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    n = hf["num_hidden_layers"]
    layer_types = list(hf.get("layer_types") or [])
    window = hf.get("sliding_window")
    if not layer_types:
        if arch == "Qwen2ForCausalLM":
            use = hf.get("use_sliding_window", False)
            mwl = hf.get("max_window_layers", n)
            layer_types = ["sliding_attention" if use and window and i >= mwl else "full_attention" for i in range(n)]
        elif arch == "MistralForCausalLM" and window:
            layer_types = ["sliding_attention"] * n
        else:
            layer_types = ["full_attention"] * n
    if arch == "Qwen2ForCausalLM" and not hf.get("use_sliding_window", False):
        layer_types = ["full_attention"] * n
    qkv_bias = bool(hf.get("attention_bias", False)) or arch == "Qwen2ForCausalLM"
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"unsupported hidden_act {hf.get('hidden_act')!r} for {arch}")
    return ModelConfig(
        family="llama", architecture=arch, model_type=hf.get("model_type", "llama"),
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=n, num_attention_heads=heads,
        num_key_value_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6), act="silu", gated_mlp=True, qkv_bias=qkv_bias,
        o_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
        rope=_rope_params(hf), layer_types=layer_types,
        sliding_window=window if any(t == "sliding_attention" for t in layer_types) else None,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )


def _gemma3(hf: dict[str, Any], arch: str) -> ModelConfig:
    heads = hf["num_attention_heads"]
    n = hf["num_hidden_layers"]
    layer_types = list(hf.get("layer_types") or [])
    if not layer_types:
        pattern = hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        layer_types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(n)]
    act = hf.get("hidden_activation") or hf.get("hidden_act", "gelu_pytorch_tanh")
    rope_global = _rope_params(hf, "full_attention")
    rope_local = _rope_params(hf, "sliding_attention")
    if not isinstance(hf.get("rope_parameters"), dict):
        # transformers 4.x layout (and GGUF): local layers use rope_local_base_freq, default 10_000
        rope_local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", 10_000.0),
                      "max_position_embeddings": hf.get("max_position_embeddings", 2048)}
    return ModelConfig(
        family="gemma3", architecture=arch, model_type=hf.get("model_type", "gemma3_text"),
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
        num_hidden_layers=n, num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="rms",
        norm_eps=hf.get("rms_norm_eps", 1e-6), norm_offset=1.0,
        act={"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act, act), gated_mlp=True,
        qkv_bias=bool(hf.get("attention_bias", False)), o_bias=bool(hf.get("attention_bias", False)),
        qk_norm=True, sandwich_norms=True, rope=rope_global, rope_local=rope_local,
        layer_types=layer_types, sliding_window=hf.get("sliding_window"),
        attn_scale=float(hf.get("query_pre_attn_scalar", 256)) ** -0.5,
        embed_scale=math.sqrt(hf["hidden_size"]), tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        final_logit_softcap=hf.get("final_logit_softcapping"), attn_logit_softcap=hf.get("attn_logit_softcapping"),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )


def _gpt2(hf: dict[str, Any], arch: str) -> ModelConfig:
    d = hf["n_embd"]
    act = hf.get("activation_function", "gelu_new")
    acts = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}
    if act not in acts:
        raise CheckpointError(f"unsupported GPT-2 activation_function {act!r}")
    if hf.get("scale_attn_by_inverse_layer_idx") or hf.get("reorder_and_upcast_attn"):
        raise CheckpointError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
    n = hf["n_layer"]
    return ModelConfig(
        family="gpt2", architecture=arch, model_type="gpt2", vocab_size=hf["vocab_size"], hidden_size=d,
        intermediate_size=hf.get("n_inner") or 4 * d, num_hidden_layers=n, num_attention_heads=hf["n_head"],
        num_key_value_heads=hf["n_head"], head_dim=d // hf["n_head"], max_position_embeddings=hf.get("n_positions", 1024),
        norm="layer", norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_bias=True, act=acts[act], gated_mlp=False,
        qkv_bias=True, o_bias=True, mlp_bias=True, layer_types=["full_attention"] * n, learned_pos=True,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )


def _opt(hf: dict[str, Any], arch: str) -> ModelConfig:
    if not hf.get("do_layer_norm_before", True):
        raise CheckpointError("OPT with do_layer_norm_before=false (post-LayerNorm, e.g. opt-350m) is not supported")
    if hf.get("word_embed_proj_dim", hf["hidden_size"]) != hf["hidden_size"]:
        raise CheckpointError("OPT with word_embed_proj_dim != hidden_size (project_in/out) is not supported")
    if hf.get("activation_function", "relu") != "relu":
        raise CheckpointError(f"unsupported OPT activation_function {hf.get('activation_function')!r}")
    n = hf["num_hidden_layers"]
    bias = bool(hf.get("enable_bias", True))
    return ModelConfig(
        family="opt", architecture=arch, model_type="opt", vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["ffn_dim"], num_hidden_layers=n, num_attention_heads=hf["num_attention_heads"],
        num_key_value_heads=hf["num_attention_heads"], head_dim=hf["hidden_size"] // hf["num_attention_heads"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048), norm="layer", norm_eps=1e-5,
        norm_bias=bool(hf.get("layer_norm_elementwise_affine", True)), act="relu", gated_mlp=False,
        qkv_bias=bias, o_bias=bias, mlp_bias=bias, layer_types=["full_attention"] * n, learned_pos=True, pos_offset=2,
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"), pad_token_id=hf.get("pad_token_id"),
    )
