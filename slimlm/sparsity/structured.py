"""Structured pruning to a genuinely smaller dense model: KV-head groups, MLP channels, layers.

Importance comes from one calibration pass over the shared driver
(:func:`slimlm.calib.driver.run_layerwise`), all on the dense model:

* a KV group (one key/value head and the query heads that share it) scores the energy its heads
  add to the attention output, ``sum_tokens ||W_o[:, h] x_h||^2`` from the per-head Gram matrices
  of ``o_proj``'s input;
* an MLP channel ``j`` scores ``sum_tokens x_j^2 * ||W_down[:, j]||^2`` (``down_proj``'s input);
* a decoder layer scores its block influence ``BI = 1 - mean_token cos(h_in, h_out)`` (ShortGPT):
  layers that barely change the residual stream go first.

Every kept layer keeps the *same* number of groups and channels (its own best ones), so the result
is a normal uniform config: ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``,
``num_hidden_layers`` and ``layer_types`` are updated, and ``save_model`` / ``export_hf`` write
the smaller HF config. ``recovery`` is an optional callable (e.g. a short fine-tune from the
trainer) run on the pruned model.

Example::

    cfg = StructuredPruneConfig(target_ratio=0.75)
    report = structured_prune_(lm.model, cfg, samples)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from slimlm.models.transformer import Transformer
from slimlm.transforms import TransformConfig, TransformReport, register_transform
from slimlm.utils.errors import ConfigError, SlimlmError


@dataclass
class StructuredPruneConfig(TransformConfig):
    """What to remove: a target parameter ratio, or explicit counts."""

    kind: ClassVar[str] = "prune-structured"
    family: ClassVar[str] = "prune"
    target_ratio: float = field(default=0.0, metadata={"min": 0, "lt": 1, "help": "keep this fraction of all parameters (0 = use the explicit counts)"})
    remove_layers: int = field(default=-1, metadata={"min": -1, "help": "decoder layers to remove (-1 = derive from target_ratio)"})
    kv_groups: int = field(default=-1, metadata={"min": -1, "help": "KV-head groups to keep per layer (-1 = derive from target_ratio / keep all)"})
    intermediate_size: int = field(default=-1, metadata={"min": -1, "help": "MLP channels to keep per layer (-1 = derive / keep all)"})
    layer_share: float = field(default=0.5, metadata={"min": 0, "max": 1, "help": "target_ratio: share of the removed parameters taken as whole layers"})
    head_share: float = field(default=0.0, metadata={"min": 0, "max": 1, "help": "target_ratio: share of the rest taken as KV groups (the remainder: MLP channels)"})
    round_to: int = field(default=32, metadata={"min": 1, "help": "round the kept intermediate size down to a multiple of this"})

    def validate(self) -> None:
        if not 0.0 <= self.target_ratio < 1.0:
            raise ConfigError(f"target_ratio must be in (0, 1) (or 0 = explicit counts), got {self.target_ratio}")
        for name in ("layer_share", "head_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1], got {v}")
        if self.kv_groups == 0:
            raise ConfigError("kv_groups 0 would remove all attention heads of every layer; keep at least 1")
        if self.intermediate_size == 0:
            raise ConfigError("intermediate_size 0 would remove every MLP channel; keep at least 1")
        if self.kv_groups < -1 or self.intermediate_size < -1 or self.round_to < 1:
            raise ConfigError("kv_groups and intermediate_size must be >= 1 (or -1 = derive) and round_to >= 1")


# --- scoring ------------------------------------------------------------------------------------
class StructuredScorer:
    """LayerwiseAlgorithm that only measures (nothing is modified during the pass)."""

    name = "structured-scores"
    sequential = False
    needs_full_forward = True  # its layer-output hook (block influence) must see every capture forward

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        self.h, self.kv, self.dh = num_heads, num_kv_heads, head_dim
        self.head_gram: dict[int, torch.Tensor] = {}  # layer -> [H, Dh, Dh]
        self.chan_sq: dict[int, torch.Tensor] = {}  # layer -> [F]
        self.bi_sum: dict[int, float] = {}
        self.bi_n: dict[int, int] = {}
        self._hook: Any = None
        self._idx = 0

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        return [["self_attn.o_proj", "mlp.down_proj"]]

    def begin_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self._idx = layer_idx

        def hook(mod: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            h_in = args[0].float().reshape(-1, args[0].shape[-1])  # [tokens, D]
            h_out = (out[0] if isinstance(out, tuple) else out).float().reshape(-1, h_in.shape[-1])
            cos = torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)  # [tokens]
            self.bi_sum[layer_idx] = self.bi_sum.get(layer_idx, 0.0) + float((1 - cos).sum())
            self.bi_n[layer_idx] = self.bi_n.get(layer_idx, 0) + cos.numel()

        self._hook = layer.register_forward_hook(hook)

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        # x: [tokens, in]
        if path == "self_attn.o_proj":
            xh = x.double().reshape(-1, self.h, self.dh).transpose(0, 1)  # [H, tokens, Dh]
            g = xh.transpose(1, 2) @ xh  # [H, Dh, Dh]
            self.head_gram[self._idx] = self.head_gram.get(self._idx, 0) + g
        else:
            self.chan_sq[self._idx] = self.chan_sq.get(self._idx, 0) + x.double().pow(2).sum(0)

    def finish_group(self, layer_idx: int, layer: nn.Module, paths: list[str]) -> None:
        pass

    def end_layer(self, layer_idx: int, layer: nn.Module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    # pure read-outs ---------------------------------------------------------------------------
    def group_scores(self, layer_idx: int, w_o: torch.Tensor) -> torch.Tensor:
        """[KV groups]: summed output energy of each group's query heads. w_o: [D, H*Dh]."""
        g = self.head_gram[layer_idx]  # [H, Dh, Dh]
        wh = w_o.double().reshape(w_o.shape[0], self.h, self.dh).transpose(0, 1)  # [H, D, Dh]
        energy = torch.einsum("hdi,hij,hdj->h", wh, g, wh)  # tr(W_h G_h W_h^T)
        return energy.reshape(self.kv, self.h // self.kv).sum(1)

    def channel_scores(self, layer_idx: int, w_down: torch.Tensor) -> torch.Tensor:
        """[F]: x_j^2 summed over tokens times ||W_down[:, j]||^2. w_down: [D, F]."""
        return self.chan_sq[layer_idx] * w_down.double().pow(2).sum(0)

    def block_influence(self) -> dict[int, float]:
        return {i: self.bi_sum[i] / max(self.bi_n[i], 1) for i in self.bi_sum}


# --- planning -----------------------------------------------------------------------------------
@dataclass
class StructuredPlan:
    remove_layers: list[int]
    kv_groups: int
    intermediate_size: int

    def to_dict(self) -> dict[str, Any]:
        return {"remove_layers": self.remove_layers, "kv_groups": self.kv_groups,
                "intermediate_size": self.intermediate_size}


def _weight(mod: nn.Module) -> torch.Tensor:
    w = getattr(mod, "weight", None)
    if not isinstance(mod, nn.Linear) or w is None:
        raise SlimlmError(f"structured pruning needs plain linear layers (dense model), found {type(mod).__name__}")
    return w


def plan_counts(model: Transformer, cfg: StructuredPruneConfig) -> tuple[int, int, int]:
    """(layers to remove, KV groups to keep, intermediate channels to keep) from the config."""
    mc = model.config
    L, kv, f, d = mc.num_hidden_layers, mc.num_key_value_heads, mc.intermediate_size, mc.hidden_size
    rep = mc.num_attention_heads // kv
    layer0: Any = model.model.layers[0]
    layer_params = sum(p.numel() for p in layer0.parameters())
    group_params = (2 * rep + 2) * mc.head_dim * d
    chan_params = (3 if mc.gated_mlp else 2) * d
    n_rm = max(cfg.remove_layers, 0)
    groups = cfg.kv_groups if cfg.kv_groups > 0 else kv
    inter = cfg.intermediate_size if cfg.intermediate_size > 0 else f
    if cfg.target_ratio:
        total = model.num_parameters()
        budget = (1.0 - cfg.target_ratio) * total
        if cfg.remove_layers < 0:
            n_rm = min(int(round(cfg.layer_share * budget / layer_params)), L - 1)
        rest = budget - n_rm * layer_params
        kept = L - n_rm
        if cfg.kv_groups < 0 and cfg.head_share > 0:
            groups = kv - min(int(cfg.head_share * rest / (kept * group_params)), kv - 1)
            rest -= (kv - groups) * kept * group_params
        if cfg.intermediate_size < 0:
            drop = max(math.ceil(rest / (kept * chan_params)), 0)
            inter = (f - drop) // cfg.round_to * cfg.round_to
    if n_rm >= L:
        raise SlimlmError(f"cannot remove {n_rm} of {L} decoder layers (at least one must stay)")
    if groups < 1:
        raise SlimlmError("structured pruning would remove all attention heads of a layer; keep at least one KV group")
    if groups > kv:
        raise SlimlmError(f"kv_groups {groups} exceeds the model's {kv} KV heads")
    if not 1 <= inter <= f:
        raise SlimlmError(f"intermediate size {inter} must be in [1, {f}] (every MLP channel would be removed)")
    return n_rm, groups, inter


# --- surgery ------------------------------------------------------------------------------------
def _slice_linear(mod: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = _weight(mod).detach()
    b = getattr(mod, "bias", None)
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
    new.weight.data.copy_(w)
    if b is not None:
        new.bias.data.copy_(b.detach())
    new.requires_grad_(False)
    return new


@torch.no_grad()
def apply_plan(model: Transformer, plan: StructuredPlan, group_keep: dict[int, torch.Tensor],
               chan_keep: dict[int, torch.Tensor]) -> None:
    """Remove layers, KV groups and MLP channels in place and update ``model.config``."""
    mc = model.config
    rep, dh = mc.num_attention_heads // mc.num_key_value_heads, mc.head_dim
    old_layers: list[Any] = list(model.model.layers)
    keep_idx = [i for i in range(len(old_layers)) if i not in set(plan.remove_layers)]
    new_layers = []
    for new_i, i in enumerate(keep_idx):
        layer = old_layers[i]
        attn, mlp = layer.self_attn, layer.mlp
        if i in group_keep:
            g = group_keep[i].sort().values  # [groups] kept KV heads
            kv_rows = (g.unsqueeze(1) * dh + torch.arange(dh)).flatten()
            q_heads = (g.unsqueeze(1) * rep + torch.arange(rep)).flatten()
            q_rows = (q_heads.unsqueeze(1) * dh + torch.arange(dh)).flatten()
            attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
            attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
            attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
            attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows)
            attn.num_heads, attn.num_kv_heads = len(q_heads), len(g)
        if i in chan_keep:
            c = chan_keep[i].sort().values
            if getattr(mlp, "gated", False):
                mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=c)
            mlp.up_proj = _slice_linear(mlp.up_proj, rows=c)
            mlp.down_proj = _slice_linear(mlp.down_proj, cols=c)
        attn.layer_idx = new_i
        new_layers.append(layer)
    model.model.layers = nn.ModuleList(new_layers)
    if mc.layer_types:
        mc.layer_types = [mc.layer_types[i] for i in keep_idx]
    mc.num_hidden_layers = len(keep_idx)
    mc.num_key_value_heads = plan.kv_groups
    mc.num_attention_heads = plan.kv_groups * rep
    mc.intermediate_size = plan.intermediate_size


def structured_prune_(model: Transformer, cfg: StructuredPruneConfig, samples: Sequence[torch.Tensor],
                      recovery: Callable[[nn.Module], Any] | None = None, progress: bool = True,
                      batch_size: int | None = None) -> TransformReport:
    """Score on ``samples``, remove the least important structures, optionally run ``recovery``."""
    from slimlm.calib.driver import run_layerwise

    if not samples:
        raise SlimlmError("structured pruning needs calibration samples (give --calib FILE)")
    mc = model.config
    before = model.num_parameters()
    n_rm, groups, inter = plan_counts(model, cfg)
    t0 = time.perf_counter()
    scorer = StructuredScorer(mc.num_attention_heads, mc.num_key_value_heads, mc.head_dim)
    run_layerwise(model, samples, scorer, batch_size=batch_size, progress=progress, desc="structured: scoring layers")
    bi = scorer.block_influence()
    remove = sorted(sorted(bi, key=lambda i: bi[i])[:n_rm])
    group_keep: dict[int, torch.Tensor] = {}
    chan_keep: dict[int, torch.Tensor] = {}
    layers: list[Any] = list(model.model.layers)
    for i, layer in enumerate(layers):
        if i in remove:
            continue
        if groups < mc.num_key_value_heads:
            group_keep[i] = torch.topk(scorer.group_scores(i, _weight(layer.self_attn.o_proj)), groups).indices
        if inter < mc.intermediate_size:
            chan_keep[i] = torch.topk(scorer.channel_scores(i, _weight(layer.mlp.down_proj)), inter).indices
    plan = StructuredPlan(remove, groups, inter)
    apply_plan(model, plan, group_keep, chan_keep)
    if recovery is not None:
        recovery(model)
    after = model.num_parameters()
    return TransformReport("prune-structured", time.perf_counter() - t0, metrics={
        "plan": plan.to_dict(), "block_influence": bi, "parameters_before": before, "parameters_after": after,
        "ratio": after / before})


register_transform(StructuredPruneConfig, calibrated=True,
                   apply=lambda model, cfg, samples, progress: structured_prune_(model, cfg, samples or [],
                                                                                 progress=progress))
