"""Building blocks of the one configurable decoder block: norms, attention, MLP, decoder layer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimlm import kernels
from slimlm.models.autocast import matmul_input
from slimlm.models.config import ModelConfig
from slimlm.models.kv_cache import AttentionCache, KVCache
from slimlm.models.rope import apply_rotary


class Norm(nn.Module):
    """RMSNorm (optionally Gemma's ``(1 + w)`` form) or LayerNorm, computed in float32."""

    def __init__(self, dim: int, kind: str = "rms", eps: float = 1e-6, offset: float = 0.0, bias: bool = False):
        super().__init__()
        self.kind, self.eps, self.offset = kind, eps, offset
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D]
        dtype = x.dtype
        if self.kind == "rms" and self.bias is None:
            y = kernels.rms_norm(x, self.weight, self.eps, self.offset)  # decode-size calls only
            if y is not None:
                return y
        if self.kind == "layer":
            b = self.bias.float() if self.bias is not None else None
            return F.layer_norm(x.float(), (x.shape[-1],), self.weight.float(), b, self.eps).to(dtype)
        if self.offset:  # Gemma: normalize and scale in float32, then cast
            y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
            return (y * (self.offset + self.weight.float())).to(dtype)
        if dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Llama: normalize in float32, cast, then scale in the model dtype (as transformers does)
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(dtype)

    @torch.no_grad()
    def fold_scale_(self, s: torch.Tensor) -> None:
        """Divide this norm's output by ``s`` per channel (AWQ/SmoothQuant fold the scale forward)."""
        s = s.to(self.weight.dtype)
        self.weight.copy_((self.weight + self.offset) / s - self.offset)
        if self.bias is not None:
            self.bias.div_(s.to(self.bias.dtype))


def linear(mod: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``residual + mod(x)``; a plain ``nn.Linear`` without hooks takes the decode GEMV for small x."""
    if type(mod) is nn.Linear and not (mod._forward_pre_hooks or mod._forward_hooks):
        return kernels.linear(x, mod.weight, mod.bias, residual)
    y = mod(x)
    return y if residual is None else residual + y  # type: ignore[no-any-return]


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding: the fused kernel for decode-size x, else :func:`apply_rotary`."""
    y = kernels.rope(x, cos, sin)
    return y if y is not None else apply_rotary(x, cos, sin)


def _act(name: str):  # type: ignore[no-untyped-def]
    if name == "silu":
        return F.silu
    if name == "gelu_tanh":
        return lambda x: F.gelu(x, approximate="tanh")
    if name == "gelu":
        return F.gelu
    if name == "relu":
        return F.relu
    raise ValueError(f"unsupported activation {name!r}")


class _Fusion:
    """One matmul for several ``nn.Linear`` sharing an input (q/k/v, gate/up) at batch-1 decode.

    The separate modules keep their names (checkpoints and compression methods see them), but
    their weights become views into one concatenated tensor. If any module is later replaced
    (quantized, pruned) or its weight re-assigned, the views no longer line up and the fused
    path switches itself off for good (dropping the concatenated tensor). The concatenated tensor
    is detached from the Parameters, so it serves inference only: a call with grad enabled and a
    trainable weight runs the separate modules and autograd reaches each Parameter (in-place
    optimizer updates of the views reach the fused matmul afterwards).
    """

    def __init__(self, mods: list[nn.Linear]):
        w = torch.cat([m.weight.detach() for m in mods], 0)
        self.sizes = [m.out_features for m in mods]
        for m, part in zip(mods, w.split(self.sizes, 0), strict=True):
            m.weight = nn.Parameter(part, requires_grad=m.weight.requires_grad)
        self.weight = w
        self.bias = None
        if mods[0].bias is not None:
            b = torch.cat([m.bias.detach() for m in mods], 0)  # type: ignore[union-attr]
            for m, part in zip(mods, b.split(self.sizes, 0), strict=True):
                m.bias = nn.Parameter(part, requires_grad=m.bias.requires_grad)  # type: ignore[union-attr]
            self.bias = b
        self.params = [m.weight for m in mods]

    @staticmethod
    def possible(mods: list[nn.Module]) -> bool:
        if not all(type(m) is nn.Linear for m in mods):
            return False
        lin = [m for m in mods if isinstance(m, nn.Linear)]
        return (len({m.weight.dtype for m in lin}) == 1 and len({m.bias is None for m in lin}) == 1
                and not any(m.weight.is_meta for m in lin))

    def valid(self, mods: list[nn.Module]) -> bool:
        # identity of the Parameter objects: cheap enough for every decode step (in-place edits keep
        # the views valid; a new module or a re-assigned Parameter does not)
        for m, p in zip(mods, self.params, strict=True):
            if type(m) is not nn.Linear or m.weight is not p:  # type: ignore[union-attr]
                return False
        return True

    @staticmethod
    def hooked(mods: list[nn.Module]) -> bool:
        """Hooks (calibration capture) must see each module's own call: run unfused meanwhile."""
        return any(m._forward_pre_hooks or m._forward_hooks for m in mods)

    def training(self, mods: list[nn.Module]) -> bool:
        """Whether autograd must reach the separate Parameters: the concatenated tensor is detached
        from them, so a call with grad enabled and a trainable weight or bias runs unfused."""
        if not torch.is_grad_enabled():
            return False  # inference (no_grad / inference_mode): one cheap check
        return any(p.requires_grad for m in mods for p in m.parameters(recurse=False))

    def usable(self, mods: list[nn.Module]) -> bool:
        """Run the fused matmul now? Drops the fusion for good when a module was swapped."""
        return not self.hooked(mods) and not self.training(mods)


@dataclass
class AttnContext:
    """Per-forward state shared by all layers: rotary tables, masks, cache."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]  # layer type -> (cos, sin): [B, T, 1, D]
    masks: dict[str, torch.Tensor | None]  # layer type -> bool [B, 1, T, S] (True = attend) or None
    is_causal: bool  # use SDPA's built-in causal mask (no explicit mask, no cache history)
    cache: KVCache | AttentionCache | None = None  # the decode kernels need the contiguous KVCache


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.layer_type = cfg.layer_types[layer_idx] if cfg.layer_types else "full_attention"
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.head_dim**-0.5
        self.softcap = cfg.attn_logit_softcap
        d = cfg.hidden_size
        self.q_proj: nn.Module = nn.Linear(d, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj: nn.Module = nn.Linear(d, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj: nn.Module = nn.Linear(d, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj: nn.Module = nn.Linear(cfg.q_size, d, bias=cfg.o_bias)
        self.use_rope = cfg.rope is not None
        self._fusion: _Fusion | None = None
        if cfg.qk_norm:
            self.q_norm: Norm | None = Norm(cfg.head_dim, "rms", cfg.norm_eps, cfg.norm_offset)
            self.k_norm: Norm | None = Norm(cfg.head_dim, "rms", cfg.norm_eps, cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def fuse_(self) -> bool:
        """Concatenate q/k/v weights for one decode matmul (see :class:`_Fusion`)."""
        mods = [self.q_proj, self.k_proj, self.v_proj]
        self._fusion = _Fusion(mods) if _Fusion.possible(mods) else None  # type: ignore[arg-type]
        return self._fusion is not None

    def _fused_qkv(self, x: torch.Tensor) -> torch.Tensor | None:
        """The fused q|k|v matmul ``[B, T, (H + 2 Hkv) Dh]``, or ``None`` when fusion is off."""
        f = self._fusion
        if f is not None:
            mods = [self.q_proj, self.k_proj, self.v_proj]
            if not f.valid(mods):
                self._fusion = None  # a module was swapped or re-assigned: fall back for good
            elif f.usable(mods):
                return kernels.linear(x, f.weight, f.bias)
        return None

    def forward(self, x: torch.Tensor, ctx: AttnContext, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> o_proj output [B, T, D] (plus ``residual`` when given: one fused add)."""
        b, t, _ = x.shape
        qkv = self._fused_qkv(x)
        if qkv is not None and t == 1 and isinstance(ctx.cache, KVCache) and self.softcap is None and self.q_norm is None:
            # decode step: rotary + cache write + attention in one kernel call when available
            cache = ctx.cache
            cache.check_room(1)
            cos, sin = ctx.rope[self.layer_type] if self.use_rope else (None, None)
            out = kernels.attn_decode(qkv, cos, sin, cache.k, cache.v, self.layer_idx, cache.length,
                                      ctx.masks.get(self.layer_type), self.num_heads, self.num_kv_heads, self.scale)
            if out is not None:
                return linear(self.o_proj, out, residual)
        if qkv is not None:
            assert self._fusion is not None
            q, k, v = qkv.split(self._fusion.sizes, -1)
        else:
            q, k, v = (m(matmul_input(m, x)) for m in (self.q_proj, self.k_proj, self.v_proj))
        q = q.view(b, t, -1, self.head_dim)  # [B, T, H, Dh]
        k = k.view(b, t, -1, self.head_dim)  # [B, T, Hkv, Dh]
        v = v.view(b, t, -1, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            cos, sin = ctx.rope[self.layer_type]  # [B, T, 1, Dh]
            q = rotary(q, cos, sin)
            if not getattr(ctx.cache, "rotates_keys", False):  # a streaming cache rotates keys itself
                k = rotary(k, cos, sin)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H(kv), T, Dh]
        mask = ctx.masks.get(self.layer_type)
        if ctx.cache is not None:  # the cache stores k/v and runs _attend over the history
            out = ctx.cache.attend(self.layer_idx, q, k, v, mask, ctx.is_causal, self._attend)
        else:
            out = self._attend(q, k, v, mask, ctx.is_causal)  # [B, H, T, Dh]
        return linear(self.o_proj, out.transpose(1, 2).reshape(b, t, -1), residual)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool) -> torch.Tensor:
        """q: [B, H, T, Dh], k/v: [B, Hkv, S, Dh], mask bool [B|1, 1, T, S] -> [B, H, T, Dh]."""
        if self.softcap is not None:
            return self._eager(q, k, v, mask, is_causal)  # type: ignore[no-any-return]
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal and mask is None and q.shape[2] > 1,
            scale=self.scale, enable_gqa=self.num_kv_heads != self.num_heads,
        )

    def _eager(self, q, k, v, mask, is_causal):  # type: ignore[no-untyped-def]
        rep = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)).float() * self.scale  # [B, H, T, S]
        s = torch.tanh(s / self.softcap) * self.softcap
        if mask is None and is_causal:
            t, sk = s.shape[-2:]
            mask = torch.ones(t, sk, dtype=torch.bool).tril(sk - t)
        if mask is not None:
            s = s.masked_fill(~mask, float("-inf"))
        return (s.softmax(-1).to(q.dtype)) @ v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gated = cfg.gated_mlp
        if self.gated:
            self.gate_proj: nn.Module = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj: nn.Module = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj: nn.Module = nn.Linear(f, d, bias=cfg.mlp_bias)
        self.act = _act(cfg.act)
        self.silu = cfg.act == "silu"
        self._fusion: _Fusion | None = None

    def fuse_(self) -> bool:
        """Concatenate gate/up weights for one decode matmul (see :class:`_Fusion`)."""
        mods = [self.gate_proj, self.up_proj] if self.gated else []
        self._fusion = _Fusion(mods) if mods and _Fusion.possible(mods) else None  # type: ignore[arg-type]
        return self._fusion is not None

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, T, D] -> down_proj output (plus ``residual`` when given: one fused add)."""
        if self.gated:
            f = self._fusion
            if f is not None:
                mods = [self.gate_proj, self.up_proj]
                if not f.valid(mods):
                    self._fusion = None
                elif f.usable(mods):
                    gu = kernels.linear(x, f.weight, f.bias)  # [..., 2F]
                    a = kernels.silu_mul(gu) if self.silu else None
                    if a is None:
                        gate, up = gu.split(f.sizes, -1)
                        a = self.act(gate) * up
                    return linear(self.down_proj, a, residual)
            g, u = self.gate_proj, self.up_proj
            return linear(self.down_proj, self.act(g(matmul_input(g, x))) * u(matmul_input(u, x)), residual)
        return linear(self.down_proj, self.act(self.up_proj(x)), residual)


class DecoderLayer(nn.Module):
    """Pre-norm block; Gemma adds post-attention and post-MLP norms (sandwich)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        d = cfg.hidden_size

        def norm() -> Norm:
            return Norm(d, cfg.norm, cfg.norm_eps, cfg.norm_offset, cfg.norm_bias)

        self.attn_norm = norm()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp_norm = norm()
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if self.sandwich:
            self.attn_post_norm = norm()
            self.mlp_post_norm = norm()

    def _make_plan(self) -> tuple[Any, ...] | None:
        """What a one-call decode step needs, if this is a plain Llama-form layer (else None).

        Returns (links, hook dicts, kernel arguments). ``links`` are (dict, key, object) triples for
        every submodule, Parameter and buffer used, so the plan is re-validated each step by identity
        alone (a module swap, a re-assigned tensor or an added hook sends the step to the torch path).
        Linears may be plain (fp32/bf16, fused or not) or offer ``decode_spec()`` (int8 / int4).
        """
        at, mlp, n1, n2 = self.self_attn, self.mlp, self.attn_norm, self.mlp_norm
        if (not mlp.gated or at.softcap is not None or at.q_norm is not None or not mlp.silu or n1.kind != "rms"
                or n1.offset or n1.bias is not None or n2.bias is not None or n1.eps != n2.eps):
            return None
        qkv_mods = [at.q_proj, at.k_proj, at.v_proj]
        gu_mods = [mlp.gate_proj, mlp.up_proj]
        o, down = at.o_proj, mlp.down_proj
        fa, fm = at._fusion, mlp._fusion
        if fa is not None and not fa.valid(qkv_mods):
            fa = at._fusion = None
        if fm is not None and not fm.valid(gu_mods):
            fm = mlp._fusion = None
        qkv = ([kernels.dense_spec(fa.weight, fa.bias)] if fa is not None
               else [kernels.linear_spec(m) for m in qkv_mods])
        gu = ([kernels.dense_spec(fm.weight, fm.bias)] if fm is not None
              else [kernels.linear_spec(m) for m in gu_mods])
        ot, dt = kernels.linear_spec(o), kernels.linear_spec(down)
        if ot is None or dt is None or any(t is None for t in qkv + gu):
            return None
        links: list[tuple[dict[str, Any], str, Any]] = [
            (self._modules, "attn_norm", n1), (self._modules, "self_attn", at), (self._modules, "mlp_norm", n2),
            (self._modules, "mlp", mlp), (at.__dict__, "_fusion", fa), (mlp.__dict__, "_fusion", fm),
            (at._modules, "o_proj", o), (mlp._modules, "down_proj", down)]
        links += [(at._modules, n, m) for n, m in zip(("q_proj", "k_proj", "v_proj"), qkv_mods, strict=True)]
        links += [(mlp._modules, n, m) for n, m in zip(("gate_proj", "up_proj"), gu_mods, strict=True)]
        for m in (n1, n2, o, down, *qkv_mods, *gu_mods):
            links += [(m._parameters, n, p) for n, p in m._parameters.items()]
            links += [(m._buffers, n, b) for n, b in m._buffers.items()]
            if "_decode" in m.__dict__:  # a quantized linear's kernel spec (rebuilt by process_after_loading)
                links.append((m.__dict__, "_decode", m.__dict__["_decode"]))
        mods = (self, n1, n2, at, mlp, o, down, *qkv_mods, *gu_mods)
        hooks = [d for m in mods for d in (m._forward_pre_hooks, m._forward_hooks)]
        args = ((n1.weight, n2.weight), n1.eps, kernels.layer_linears(qkv, ot, gu, dt), at.layer_idx,  # type: ignore[arg-type]
                at.num_heads, at.num_kv_heads, at.scale)
        return links, hooks, args

    def _decode_step(self, h: torch.Tensor, ctx: AttnContext) -> torch.Tensor | None:
        """The whole layer in one kernel call for a decode step of a plain Llama-form layer, else None."""
        cache = ctx.cache
        if not isinstance(cache, KVCache):  # no cache, or a paged one: the torch path
            return None
        plan = self.__dict__.get("_plan")
        if plan is None or not all(d.get(k) is v for d, k, v in plan[0]):
            plan = self._make_plan()
            self.__dict__["_plan"] = plan
            if plan is None:
                return None
        links, hooks, (norms, eps, linears, idx, heads, kv_heads, scale) = plan
        if any(hooks[2:]):  # hooks on this layer itself still run: __call__ handles them
            return None
        at = self.self_attn
        cache.check_room(1)
        cos, sin = ctx.rope[at.layer_type] if at.use_rope else (None, None)
        return kernels.decode_layer(h, norms, eps, linears, cos, sin, cache.k, cache.v, idx, cache.length,
                                    ctx.masks.get(at.layer_type), heads, kv_heads, scale)

    def forward(self, h: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        # h: [B, T, D]
        if h.shape[1] == 1 and not self.sandwich:
            y = self._decode_step(h, ctx)
            if y is not None:
                return y
        if not self.sandwich:  # residual adds fused into o_proj / down_proj
            h = self.self_attn(self.attn_norm(h), ctx, h)
            return self.mlp(self.mlp_norm(h), h)  # type: ignore[no-any-return]
        a = self.self_attn(self.attn_norm(h), ctx)
        if self.sandwich:
            a = self.attn_post_norm(a)
        h = h + a
        m = self.mlp(self.mlp_norm(h))
        if self.sandwich:
            m = self.mlp_post_norm(m)
        return h + m
