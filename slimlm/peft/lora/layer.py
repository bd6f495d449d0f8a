"""``LoraLinear``: a frozen base linear (plain or any compressed kind) plus a trainable low-rank update.

``y = base(x) + scaling * lora_B(lora_A(dropout(x)))`` with ``lora_A: [r, in]``, ``lora_B: [out, r]``
(peft's module and parameter names, so the state-dict keys map one to one onto peft's adapter
files). The base stays where it was (``base_layer``): a quantized base keeps its codes and takes the
input-gradient-only backward of ``slimlm.quant.linear.autograd``. The adapter computes in its own
dtype (float32 master weights; autocast lowers the matmuls to bf16 where it is on).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.models.autocast import autocast_input, matmul_input
from slimlm.models.layers import linear
from slimlm.peft.base import AdapterLayer
from slimlm.peft.lora.init import Quantizer, loftq_init, pissa_init
from slimlm.utils.errors import ConfigError, SlimlmError

DEFAULT, BASE = "default", "__base__"  # the adapter made by apply_peft / load_adapter; no adapter at all


class LoraPair(nn.Module):
    """One more LoRA adapter on a wrapped layer (``A: [r, in]``, ``B: [out, r]``), resident next to
    the default one and chosen per call (multi-LoRA serving)."""

    def __init__(self, in_f: int, out_f: int, r: int, scaling: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.r, self.scaling = r, scaling
        self.lora_A = nn.Linear(in_f, r, bias=False)  # [r, in]
        self.lora_B = nn.Linear(r, out_f, bias=False)  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.lora_A.weight
        return self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype)))) * self.scaling  # type: ignore[no-any-return]


class LoraLinear(AdapterLayer):
    """Wrap ``base`` (``nn.Linear`` or a ``SwappableLinear``) with a LoRA update of rank ``r``."""

    def __init__(self, base: nn.Module, r: int, scaling: float, dropout: float = 0.0, init: str = "kaiming",
                 dtype: torch.dtype = torch.float32, use_dora: bool = False) -> None:
        super().__init__()
        in_f, out_f = int(base.in_features), int(base.out_features)  # type: ignore[arg-type]
        if r > min(in_f, out_f):
            raise ConfigError(f"LoRA rank {r} is larger than the layer ({out_f} x {in_f}): use r <= {min(in_f, out_f)}")
        self.base_layer = base
        self.in_features, self.out_features, self.r, self.scaling = in_f, out_f, r, scaling
        self.lora_A = nn.Linear(in_f, r, bias=False, dtype=dtype)  # [r, in]
        self.lora_B = nn.Linear(r, out_f, bias=False, dtype=dtype)  # [out, r]
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.reset_lora(init)
        self.use_dora = use_dora
        self._merge_scale: torch.Tensor | None = None  # DoRA's m / ||W + dW|| at merge time (for unmerge)
        self._init_ab: tuple[torch.Tensor, torch.Tensor] | None = None  # PiSSA's initial (A, B)
        self.extra: nn.ModuleDict | None = None  # more resident adapters by name (LoraPair)
        self.active = DEFAULT  # the adapter a call runs (set_adapter), unless row_adapters names one per row
        self.row_adapters: list[str] | None = None
        if use_dora:  # DoRA: magnitude m [out] starts as the row norms of the adapted weight
            self.lora_magnitude_vector = nn.Parameter(self._weight_norm(self.base_weight()))

    @property
    def reads_base_weight(self) -> bool:
        """DoRA reads the base weight outside a matmul (its fp32 row norms): slimlm.train.frozen keeps it fp32."""
        return self.use_dora

    @torch.no_grad()
    def reset_lora(self, init: str) -> None:
        """Kaiming-uniform A (torch's ``nn.Linear`` default, as peft), or N(0, 1/r); B zero so the
        adapter starts as a no-op ("random" keeps B Kaiming-uniform too)."""
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        if init == "random":
            nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5))
        else:
            nn.init.zeros_(self.lora_B.weight)

    @torch.no_grad()
    def init_from_base(self, init: str, quantize: Quantizer | None = None, iters: int = 1) -> None:
        """PiSSA (the base keeps the residual in its own dtype) or LoftQ (the base becomes the quantized
        module ``quantize`` returns); see :mod:`slimlm.peft.lora.init`. Needs a plain float base."""
        base = self.base_layer
        if type(base) is not nn.Linear:
            raise ConfigError(f"init_lora_weights={init!r} needs the float weights of a plain linear, not a "
                              f"{type(base).__name__} (LoftQ quantizes the float base itself)")
        w = base.weight.detach().float()
        if init == "pissa":
            a, b, res = pissa_init(w, self.r, self.scaling)
            base.weight.copy_(res.to(base.weight.dtype))
            self._init_ab = (a.clone(), b.clone())  # for saving as plain LoRA on the original base
        else:
            assert quantize is not None
            bias = None if base.bias is None else base.bias.detach().float()
            q, a, b = loftq_init(w, bias, self.r, self.scaling, quantize, iters)
            q.requires_grad_(False)
            self.base_layer = q
        self.lora_A.weight.copy_(a)
        self.lora_B.weight.copy_(b)

    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A``: ``[out, in]`` float32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _weight_norm(self, w: torch.Tensor) -> torch.Tensor:
        """DoRA: row norms ``||W + dW||`` [out], detached (the paper's and peft's gradient shortcut)."""
        return torch.linalg.norm(w + self.delta_weight().detach(), dim=1).detach()

    def merged_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The weight the adapted layer stands for: ``W + dW`` (DoRA: ``m / ||W + dW|| * (W + dW)``)."""
        if not self.use_dora:
            return w + self.delta_weight()
        s = self.lora_magnitude_vector.float() / self._weight_norm(w)
        return s.unsqueeze(1) * (w + self.delta_weight())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        y = linear(self.base_layer, matmul_input(self.base_layer, x))  # a plain base: the decode GEMV for a few rows
        if self.merged:
            return y  # type: ignore[no-any-return]
        if self.row_adapters is None and self.active == DEFAULT:
            return self._default(x, y)
        return self._chosen(x, y)

    def _default(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The default adapter on ``y = base(x)``."""
        a = self.lora_A.weight
        # under autocast (no dropout) the adapter reads the base's bf16 copy of x (slimlm.models.autocast)
        shared = torch.is_autocast_enabled("cpu") and isinstance(self.lora_dropout, nn.Identity)
        lx = autocast_input(x) if shared else self.lora_dropout(x.to(a.dtype))
        if not self.use_dora:
            bx = self.lora_B(self.lora_A(lx))  # [..., out]
            if type(self.base_layer) is nn.Linear and bx.dtype == y.dtype and bx.shape == y.shape:
                # into the plain base's fresh output: no scaled copy, no sum (autograd saves neither
                # y nor bx; a compressed base's output may be a view, so it keeps the plain sum)
                return y.add_(bx, alpha=self.scaling)
            return y + (bx * self.scaling).to(y.dtype)
        lora = self.lora_B(self.lora_A(lx)) * self.scaling  # [..., out]
        # DoRA: y = base(x) + (s - 1) * W x + s * dW x, s = m / ||W + dW|| (norm detached), as peft computes it
        w = self.base_weight()
        s = self.lora_magnitude_vector / self._weight_norm(w)  # [out]
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, "bias", None)
            base = y.to(a.dtype) - (bias.to(a.dtype) if bias is not None else 0.0)
        else:
            base = F.linear(lx, w.to(a.dtype))
        return y + ((s - 1) * base + s * lora).to(y.dtype)

    def _one(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if name == DEFAULT:
            return self._default(x, y)
        pair = self.extra[name] if self.extra is not None and name in self.extra else None
        if pair is None:  # BASE, or an adapter that does not touch this layer
            return y
        return y + pair(x).to(y.dtype)  # type: ignore[no-any-return]

    def _chosen(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The active adapter, or per batch row the adapter ``row_adapters`` names (x: [B, ...])."""
        names = self.row_adapters
        if names is None:
            return self._one(self.active, x, y)
        if len(names) != x.shape[0]:
            raise SlimlmError(f"adapter_names has {len(names)} entries for a batch of {x.shape[0]} rows")
        out = y.clone()
        for name in dict.fromkeys(names):
            idx = torch.tensor([i for i, n in enumerate(names) if n == name])
            out[idx] = self._one(name, x[idx], y[idx])
        return out

    # --- several adapters resident at once -------------------------------------------------------
    def add_extra(self, name: str, r: int, scaling: float, dropout: float = 0.0) -> LoraPair:
        if self.extra is None:
            self.extra = nn.ModuleDict()
        pair = LoraPair(self.in_features, self.out_features, r, scaling, dropout)
        self.extra[name] = pair
        return pair

    # --- merge / unmerge (AdapterLayer.merge folds merged_weight in place) -----------------------
    def _save_unmerged(self) -> None:
        if self.use_dora:  # the fold's row scale, from the unmerged weight (unmerge cannot recompute it)
            self._merge_scale = self.lora_magnitude_vector.detach().float() / self._weight_norm(self.base_weight())

    def _unfold(self, w: torch.Tensor, b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.use_dora:
            assert self._merge_scale is not None
            w = w / self._merge_scale.unsqueeze(1)
        return w - self.delta_weight(), b

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = {"lora_A.weight": self.lora_A.weight, "lora_B.weight": self.lora_B.weight}
        if self.use_dora:
            out["lora_magnitude_vector"] = self.lora_magnitude_vector
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, dora={self.use_dora}, merged={self.merged}"
