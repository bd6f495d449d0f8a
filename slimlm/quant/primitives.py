"""Integer quantization primitives: choose qparams, quantize, dequantize (pure tensor functions).

Every method (RTN, GPTQ, AWQ, SmoothQuant, LLM.int8()) builds on these. The convention is the one of
:mod:`slimlm.quant.qtensor` (GPTQ's): unsigned codes ``0 <= q <= qmax = 2**bits - 1`` and

    w ~= (q - zero) * scale

- **asymmetric** (min/max): the grid always contains 0 (``xmin = min(min(w), 0)``,
  ``xmax = max(max(w), 0)``), ``scale = (xmax - xmin) / qmax``, ``zero = round(-xmin / scale)``
  (so ``0 <= zero <= qmax``); exactly the reference GPTQ quantizer.
- **symmetric** (absmax): ``zero = 2**(bits-1)``, ``scale = absmax / ((2**bits - 1) / 2)``
  (GPTQ's / torchao's choice: codes ``-2**(bits-1) .. 2**(bits-1)-1`` around the zero).

An all-zero row/group gets ``xmin, xmax = -1, 1`` (asymmetric) or ``absmax = 1`` (symmetric) so the
scale is never 0. Granularity is a ``group_size`` (one meaning everywhere in slimlm): ``g > 0``
columns per group, ``-1`` = per output channel (one group per row), ``0`` = per tensor (one scale,
broadcast to every row so the result still is a :class:`QuantizedWeight` with ``scale: [out, 1]``).
A group size that does not divide the row leaves a shorter last group, as the GPTQ reference code
slices it (SmolLM2's 576-wide rows at g128: 4 x 128 + 64); ``n_groups = ceil(in / group_size)``.
Only a consumer that cannot hold a short group (an export format) asks for ``ragged=False``.

Optional MSE clipping search (``clip_search=True``): for shrink factors ``p = 1 - i / grid``
(``i < max_shrink * grid``) the range is shrunk to ``p * [xmin, xmax]`` and, per row and group, the
``p`` with the lowest ``sum |w - dq(q(w))|**norm`` wins (GPTQ's ``mse`` option; norm 2.4 by default).

Run the exact-match tests with ``.venv/bin/pytest tests/quant/test_primitives.py``.
"""

from __future__ import annotations

import torch

from slimlm.quant.qtensor import QuantizedWeight
from slimlm.utils.errors import ConfigError


def check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ConfigError(f"bits must be an integer in 2..8, got {bits!r}")


def resolve_group_size(in_features: int, group_size: int, where: str = "", ragged: bool = True) -> int:
    """Columns per group for a row of ``in_features``: -1 -> in_features (per channel); 0 -> per tensor.

    A positive group size that does not divide the row leaves a shorter last group (as the GPTQ
    reference code: 576 = 4 x 128 + 64). ``ragged=False`` is for a consumer that needs whole groups
    (an export format): it raises ConfigError with the reason and the fix.
    """
    if group_size == -1 or group_size == 0:
        return in_features
    if group_size < 0:
        raise ConfigError(f"group_size must be -1 (per channel), 0 (per tensor) or positive, got {group_size}")
    if in_features % group_size != 0 and not ragged:
        at = f" of {where}" if where else ""
        raise ConfigError(
            f"group_size {group_size} does not divide the row length {in_features}{at}: this format cannot hold "
            f"a shorter last group; quantize with a group size dividing {in_features} or -1 (per channel)"
        )
    return group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """[out, in] -> [out, n_groups, group_size]; a ragged last group is padded with zeros.

    Zero padding changes nothing: the grid always contains 0 (min/max include 0, absmax ignores 0)
    and 0 is represented exactly, so padded entries add no error to any clipping search either.
    """
    out, inp = w.shape
    pad = (-inp) % group_size
    if pad:
        w = torch.cat([w, w.new_zeros(out, pad)], dim=1)
    return w.reshape(out, -1, group_size)


def qparams_from_range(
    xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero from a range (any shape; xmin <= 0 <= xmax is enforced here).

    Returns ``scale`` (float32) and ``zero`` (int32) of the same shape as ``xmin``.
    """
    qmax = 2**bits - 1
    xmin = torch.clamp(xmin.float(), max=0.0)
    xmax = torch.clamp(xmax.float(), min=0.0)
    if symmetric:
        absmax = torch.maximum(-xmin, xmax)
        absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
        scale = absmax / (qmax / 2)
        zero = torch.full_like(scale, 2 ** (bits - 1), dtype=torch.int32)
        return scale, zero
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -torch.ones_like(xmin), xmin)
    xmax = torch.where(both_zero, torch.ones_like(xmax), xmax)
    scale = (xmax - xmin) / qmax
    zero = torch.round(-xmin / scale).to(torch.int32)
    return scale, zero


def quantize_codes(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """``clamp(round(w / scale) + zero, 0, qmax)`` with broadcasting; returns int32 codes."""
    qmax = 2**bits - 1
    q = torch.round(w.float() / scale) + zero.float()
    return torch.clamp(q, 0, qmax).to(torch.int32)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` with broadcasting (float32)."""
    return (q.float() - zero.float()) * scale


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize then dequantize (the values the model will compute with)."""
    return dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero)


def choose_qparams(
    w: torch.Tensor,
    bits: int,
    group_size: int = -1,
    symmetric: bool = False,
    clip_search: bool = False,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    ragged: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zeros for ``w: [out, in]``: returns ``scale: [out, n_groups]`` float32, ``zero`` int32."""
    check_bits(bits)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    out, inp = w.shape
    w = w.float()
    if group_size == 0:  # per tensor: one range for everything, broadcast to [out, 1]
        xmin, xmax = w.min().reshape(1, 1), w.max().reshape(1, 1)
        if clip_search:
            scale, zero = _clip_search(w.reshape(1, 1, -1), xmin, xmax, bits, symmetric, grid, max_shrink, norm)
        else:
            scale, zero = qparams_from_range(xmin, xmax, bits, symmetric)
        return scale.expand(out, 1).contiguous(), zero.expand(out, 1).contiguous()
    g = resolve_group_size(inp, group_size, ragged=ragged)
    wg = _grouped(w, g)  # [out, G, g]
    xmin, xmax = wg.amin(dim=2), wg.amax(dim=2)  # [out, G]
    if clip_search:
        return _clip_search(wg, xmin, xmax, bits, symmetric, grid, max_shrink, norm)
    return qparams_from_range(xmin, xmax, bits, symmetric)


def _clip_search(
    wg: torch.Tensor,
    xmin: torch.Tensor,
    xmax: torch.Tensor,
    bits: int,
    symmetric: bool,
    grid: int,
    max_shrink: float,
    norm: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best shrink of the range per group: ``wg: [R, G, g]``, ``xmin/xmax: [R, G]``."""
    best_err = torch.full(xmin.shape, float("inf"))
    best_scale, best_zero = qparams_from_range(xmin, xmax, bits, symmetric)
    for i in range(int(max_shrink * grid)):
        p = 1 - i / grid
        scale, zero = qparams_from_range(p * xmin, p * xmax, bits, symmetric)
        dq = fake_quantize(wg, scale.unsqueeze(2), zero.unsqueeze(2), bits)
        err = (dq - wg).abs().pow(norm).sum(dim=2)  # [R, G]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


def expand_groups(t: torch.Tensor, in_features: int, group_size: int, g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """[out, n_groups] -> [out, in] following ``g_idx`` (default ``i // group_size``)."""
    if g_idx is None:
        g_idx = torch.arange(in_features) // group_size
    return t[:, g_idx.long()]


def quantize_weight(
    w: torch.Tensor,
    bits: int,
    group_size: int = -1,
    symmetric: bool = False,
    clip_search: bool = False,
    grid: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.4,
    ragged: bool = True,
) -> QuantizedWeight:
    """Round-to-nearest quantization of ``w: [out, in]`` into a :class:`QuantizedWeight`.

    Example::

        qw = quantize_weight(linear.weight, bits=4, group_size=128)
        w_hat = qw.dequantize()  # [out, in] float32
    """
    scale, zero = choose_qparams(w, bits, group_size, symmetric, clip_search, grid, max_shrink, norm, ragged)
    inp = w.shape[1]
    g = inp if group_size in (-1, 0) else group_size
    q = quantize_codes(w, expand_groups(scale, inp, g), expand_groups(zero, inp, g), bits)
    return QuantizedWeight(
        qweight=q.to(torch.uint8), scale=scale, zero=zero, bits=bits, group_size=g, symmetric=symmetric
    )


# --- activations --------------------------------------------------------------------------------
def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row (token): ``x: [..., D] -> (q int8 [..., D], scale [..., 1])``.

    ``scale = absmax / 127`` (restricted range -127..127, what ``torch._int_mm`` pipelines use).
    """
    absmax = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8)
    scale = absmax / 127.0
    q = torch.clamp(torch.round(x.float() / scale), -127, 127).to(torch.int8)
    return q, scale
