"""GPTQ (Frantar et al., 2022): quantize a weight column by column, correcting the not-yet-quantized
columns with the inverse Hessian of the layer's inputs so ``||W X - W_hat X||`` stays small.

Pure functions: :func:`make_hessian` / :func:`accumulate_hessian` (``H = 2/n * sum X^T X`` over the
calibration tokens, the one accumulator of :mod:`slimlm.calib.hessian`) and :func:`gptq_quantize` (dampening ``damp * mean(diag H)``, lazy block updates of
``block_size`` columns, act-order = columns by descending ``diag H`` with *static* groups, so the
group of column ``i`` stays ``i // group_size`` and no ``g_idx`` is needed). Without act-order the
group's grid is chosen when the sweep reaches the group, from the already-updated weights (as the
reference code does). :class:`GPTQAlgorithm` glues them to the layer-by-layer driver.

Reference protocol (``/work/shared/REFERENCE.md``): asymmetric, g128, damp 0.01, block 128,
non-sequential (every linear sees the layer input produced by the already-quantized earlier layers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from slimlm.calib.driver import resolve_calib_dtype, run_layerwise
from slimlm.calib.hessian import HessianStore, accumulate_hessian, gram, make_hessian
from slimlm.quant.config import WeightQuantConfig
from slimlm.quant.methods.base import layer_groups, layer_prefix, register_method, weight_module
from slimlm.quant.methods.rtn import quantize_top_level
from slimlm.quant.primitives import choose_qparams, resolve_group_size
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import ConfigError
from slimlm.utils.linalg import inverse_cholesky_upper

__all__ = ["GPTQAlgorithm", "GPTQConfig", "accumulate_hessian", "gptq_quantize", "gram", "make_hessian"]


@dataclass
class GPTQConfig(WeightQuantConfig):
    kind = "gptq"
    act_order: bool = field(default=True, metadata={"help": "quantize columns by descending Hessian diagonal"})
    damp: float = field(default=0.01, metadata={"min": 0, "lt": 1, "help": "dampening, fraction of the mean Hessian diagonal"})
    block_size: int = field(default=128, metadata={"min": 1, "help": "columns per lazy batch update"})
    true_sequential: bool = field(
        default=False, metadata={"help": "capture each group of linears after the earlier ones were quantized"}
    )
    clip_search: bool = field(default=False, metadata={"help": "MSE search of the grid range per group"})
    calib_dtype: str = field(
        default="auto",
        metadata={"help": "dtype of the calibration forwards: auto (bf16 where the CPU has native bf16 "
                  "matmuls, else fp32), fp32, bf16; Hessians and the GPTQ math stay fp32"},
    )

    @classmethod
    def reference_protocol(cls, bits: int = 4, act_order: bool = False) -> GPTQConfig:
        """The settings of REFERENCE.md's SmolLM2 table: asymmetric, g128 (ragged last group), damp
        0.01, block 128, not true-sequential (pair it with 64 x 512 calibration windows, seed 0)."""
        return cls(bits=bits, group_size=128, symmetric=False, act_order=act_order,
                   damp=0.01, block_size=128, true_sequential=False, calib_dtype="fp32")

    def validate(self) -> None:
        if not 0 <= self.damp < 1:
            raise ConfigError(f"gptq: damp must be in [0, 1), got {self.damp}")
        if self.block_size <= 0:
            raise ConfigError(f"gptq: block_size must be positive, got {self.block_size}")
        resolve_calib_dtype(self.calib_dtype)  # names the allowed values
        super().validate()


# --- pure functions -----------------------------------------------------------------------------
# make_hessian / gram / accumulate_hessian: the shared accumulator (slimlm.calib.hessian), re-exported


def _sweep_torch(w1: torch.Tensor, q1: torch.Tensor, err1: torch.Tensor, hinv1: torch.Tensor, scale: torch.Tensor,
                 zero: torch.Tensor, groups: torch.Tensor, c0: int, c1: int, qmax: float) -> None:
    """GPTQ's column sweep over columns ``c0 <= i < c1`` of one lazy block, in place.

    w1/q1/err1: [out, b] (weights being updated, codes as floats, scaled errors); hinv1: [b, b];
    scale/zero: [out, n_groups] floats; groups: [b] group of each column. The reference algorithm's
    arithmetic op for op (``slimlm/kernels/gptq.cpp`` is the same loop with rows in parallel).
    """
    gl = groups.tolist()
    diag = hinv1.diagonal().tolist()
    for i in range(c0, c1):
        s_g, z_g = scale[:, gl[i]], zero[:, gl[i]]
        wc = w1[:, i]
        q = torch.round(wc / s_g).add_(z_g).clamp_(0.0, qmax)  # = quantize_codes
        q1[:, i] = q
        e = (wc - (q - z_g).mul_(s_g)).div_(diag[i])  # (w - dequantized) / [H^-1]_ii: [out]
        w1[:, i:].sub_(torch.outer(e, hinv1[i, i:]))
        err1[:, i] = e


def _sweep_kernel():  # type: ignore[no-untyped-def]
    """slimlm's C++ sweep (same arithmetic, ~20x faster), or None where the kernels are unavailable."""
    from slimlm import kernels

    ext = kernels.load() if kernels.supported()[0] else None
    return getattr(ext, "gptq_sweep", None)


def gptq_quantize(
    w: torch.Tensor,
    h: torch.Tensor,
    bits: int,
    group_size: int = 128,
    symmetric: bool = False,
    act_order: bool = True,
    damp: float = 0.01,
    block_size: int = 128,
    clip_search: bool = False,
    ragged: bool = True,
) -> tuple[QuantizedWeight, float]:
    """GPTQ for ``w: [out, in]`` with Hessian ``h: [in, in]``; returns the weight and the summed loss.

    The loss is ``sum (w - q)^2 / [H^-1]_jj^2 / 2`` (the objective's decrease estimate, as in GPTQ).
    The column sweep is the reference algorithm's arithmetic, op for op (tests compare the codes with
    a plain transcription of it).
    """
    w = w.detach().float().clone()
    out, cols = w.shape
    g = resolve_group_size(cols, group_size, ragged=ragged)
    h = h.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    n_groups = -(-cols // g)
    static = act_order or group_size == 0  # act-order: grids from the original weights (static groups)
    scale = torch.zeros(out, n_groups)
    zero = torch.zeros(out, n_groups, dtype=torch.int32)
    if static:
        scale, zero = choose_qparams(w, bits, group_size, symmetric, clip_search, ragged=ragged)

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w = w[:, perm]
    h = h[perm][:, perm]
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    try:
        hinv = inverse_cholesky_upper(h)  # [in, in] upper, U^T U = H^-1
    except torch.linalg.LinAlgError:
        raise ConfigError("GPTQ: the Hessian is not positive definite; raise damp or use more calibration data") from None

    qmax = float(2**bits - 1)
    group_of = (perm // g).tolist()  # group of each (permuted) column
    new_group = [not static and c % g == 0 for c in perm.tolist()]
    scale = scale.float().contiguous()
    zero_f = zero.float().contiguous()
    sweep = _sweep_kernel() or _sweep_torch
    q_codes = torch.zeros(out, cols, dtype=torch.int32)
    loss = torch.zeros(())
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone(memory_format=torch.contiguous_format)  # [out, b]
        q1 = torch.empty_like(w1)  # codes, as floats
        err1 = torch.empty_like(w1)
        hinv1 = hinv[i1:i2, i1:i2].contiguous()
        groups = torch.tensor(group_of[i1:i2], dtype=torch.int64)
        starts = [i for i in range(i2 - i1) if new_group[i1 + i]]  # a group's grid is chosen here
        bounds = sorted({0, *starts, i2 - i1})
        for c0, c1 in zip(bounds[:-1], bounds[1:], strict=True):
            if new_group[i1 + c0]:  # new group: grid from the current (updated) weights
                gi = group_of[i1 + c0]
                upd = torch.cat([w1[:, c0:], w[:, i2:]], dim=1)[:, :g]
                sc, z = choose_qparams(upd, bits, -1, symmetric, clip_search)
                scale[:, gi], zero[:, gi] = sc[:, 0], z[:, 0]
                zero_f[:, gi] = z[:, 0].float()
            sweep(w1, q1, err1, hinv1, scale, zero_f, groups, c0, c1, qmax)
        q_codes[:, i1:i2] = q1.to(torch.int32)
        loss += err1.square().sum() / 2
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]

    inv = torch.argsort(perm)
    q_codes = q_codes[:, inv]
    qw = QuantizedWeight(
        qweight=q_codes.to(torch.uint8), scale=scale, zero=zero, bits=bits, group_size=g, symmetric=symmetric
    )
    return qw, float(loss)


# --- driver glue ----------------------------------------------------------------------------------
class GPTQAlgorithm:
    """LayerwiseAlgorithm: one Hessian per target linear, GPTQ when its group is finished."""

    name = "gptq"

    def __init__(self, cfg: GPTQConfig) -> None:
        self.cfg = cfg
        self.sequential = cfg.true_sequential
        self.hessians = HessianStore()  # q/k/v (and gate/up) share one x^T x per batch
        self.losses: dict[str, float] = {}

    def target_groups(self, layer_idx: int, layer: nn.Module) -> list[list[str]]:
        pre = layer_prefix(layer_idx)
        groups = [[p for p in grp if self.cfg.for_module(pre + p) is not None] for grp in layer_groups(layer)]
        return [grp for grp in groups if grp]

    def begin_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self.hessians.clear()

    def accumulate(self, path: str, module: nn.Module, x: torch.Tensor) -> None:
        self.hessians.add(path, x)  # x: [tokens, in]

    def finish_group(self, layer_idx: int, layer: nn.Module, paths: list[str]) -> None:
        for p in paths:
            full = layer_prefix(layer_idx) + p
            cfg = self.cfg.for_module(full)
            assert cfg is not None
            lin = layer.get_submodule(p)
            assert isinstance(lin, nn.Linear)
            h = self.hessians.pop(p)
            assert h is not None, f"no calibration input reached {full}"
            qw, loss = gptq_quantize(
                lin.weight, h, cfg.bits, cfg.group_size, cfg.symmetric, cfg.act_order, cfg.damp,
                cfg.block_size, cfg.clip_search,
            )  # fmt: skip
            self.losses[full] = loss
            layer.set_submodule(p, weight_module(lin, qw))

    def end_layer(self, layer_idx: int, layer: nn.Module) -> None:
        self.hessians.clear()


@register_method(GPTQConfig, calibrated=True)
def _apply_gptq(model: nn.Module, cfg: GPTQConfig, samples: Sequence[torch.Tensor] | None, progress: bool) -> None:
    assert samples is not None
    run_layerwise(model, samples, GPTQAlgorithm(cfg), progress=progress,  # type: ignore[arg-type]
                  compute_dtype=resolve_calib_dtype(cfg.calib_dtype))
    quantize_top_level(model, cfg)
