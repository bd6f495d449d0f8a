"""llama.cpp's K-quant encoders (Q4_K, Q5_K, Q6_K), vectorized over blocks with numpy.

Why: the ``gguf`` package de-quantizes K-quants but only encodes the 32-value types, and Q4_K_M (a mix
of Q4_K and Q6_K) is the GGUF most people download. Writing it lets a model compressed by slimlm run
in llama.cpp at the size llama.cpp users expect.

Method (llama.cpp's reference encoders without an importance matrix, ``ggml-quants.c``): a super-block
holds 256 values.

- Q4_K / Q5_K: 8 sub-blocks of 32, each ``w = d * sc[j] * q - dmin * m[j]`` with ``q`` in ``[0, 15]``
  (``[0, 31]``), 6-bit ``sc``/``m`` and float16 ``d``/``dmin``. Each sub-block's scale and min come from
  a weighted least-squares search over 21 (16) candidate grids (weights ``rms(x) + |x|``); the eight
  scales and mins are then quantized to 6 bits against the largest, and the codes recomputed with the
  rounded constants.
- Q6_K: 16 sub-blocks of 16, ``w = d * sc[j] * (q - 32)`` with ``q`` in ``[0, 63]``, int8 ``sc`` and
  float16 ``d``; each sub-block's scale comes from a search over 19 candidate grids weighted by ``x^2``.

All arithmetic is float32 in the reference's order, sums accumulated element by element, rounding
half to even (the reference's ``nearest_int``), so most blocks come out byte for byte as llama.cpp's
(the test compares against bytes ``ggml_quantize_chunk`` wrote: tests/fixtures/kquants_llamacpp.npz).

Example::

    blocks = quantize_kquant(w_f32, "Q4_K")          # [rows, cols] -> uint8 [rows, cols / 256 * 144]
    back = gguf.quants.dequantize(blocks, GGMLQuantizationType.Q4_K)

Tests: ``.venv/bin/pytest tests/loaders/test_gguf_kquants.py``.
"""

from __future__ import annotations

import numpy as np

from slimlm.utils.errors import SlimlmError

QK_K = 256
KQUANT_TYPES = ("Q4_K", "Q5_K", "Q6_K")
TYPE_SIZE = {"Q4_K": 144, "Q5_K": 176, "Q6_K": 210}
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS: an all-zero sub-block below this
f32 = np.float32


def _rint(a: np.ndarray) -> np.ndarray:
    """Round half to even in float32, as llama.cpp's ``nearest_int`` (a magic-number add)."""
    return np.rint(a.astype(np.float32, copy=False)).astype(np.int32)


def _seqsum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis element by element (the reference's loop order, not numpy's pairwise)."""
    acc = a[..., 0].copy()
    for i in range(1, a.shape[-1]):
        acc += a[..., i]
    return acc


def _to_f16(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32).astype(np.float16)


def _grid_min_search(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float,
                     nstep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of ``x`` [n, 32]: the asymmetric grid ``x ~ scale * L + min`` minimizing the ``w``-weighted
    squared error over ``nstep + 1`` candidate step sizes (llama.cpp's ``make_qkx2_quants``).

    Returns ``(scale [n], -min [n] (>= 0), L uint8 [n, 32])``.
    """
    mn = np.minimum(x.min(axis=1), f32(0))
    mx = x.max(axis=1)
    sum_w = _seqsum(w)
    sum_x = _seqsum(w * x)
    flat = mx == mn
    rng = np.where(flat, f32(1), mx - mn)
    iscale = f32(nmax) / rng
    scale = f32(1) / iscale
    L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    diff = scale[:, None] * L.astype(np.float32) + mn[:, None] - x
    best = _seqsum(w * diff * diff)
    for step in range(nstep + 1):
        isc = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / rng
        la = np.clip(_rint(isc[:, None] * (x - mn[:, None])), 0, nmax)
        lf = la.astype(np.float32)
        sum_l = _seqsum(w * lf)
        sum_l2 = _seqsum(w * lf * lf)
        sum_xl = _seqsum(w * lf * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        ok = det > 0
        sdet = np.where(ok, det, f32(1))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / sdet
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / sdet
        pos = this_min > 0
        this_min = np.where(pos, f32(0), this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, f32(1)), this_scale)
        d2 = this_scale[:, None] * lf + this_min[:, None] - x
        err = _seqsum(w * d2 * d2)
        better = ok & (err < best) & ~flat
        L = np.where(better[:, None], la, L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        mn = np.where(better, this_min, mn)
    scale = np.where(flat, f32(0), scale)
    L = np.where(flat[:, None], 0, L)
    return scale.astype(np.float32), (-mn).astype(np.float32), L.astype(np.uint8)


def _pack_scales_k4(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """6-bit scales and mins [nb, 8] -> Q4_K/Q5_K's 12 scale bytes [nb, 12]."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _quantize_k_asym(x: np.ndarray, nmax: int, rmin: float, nstep: int) -> tuple[np.ndarray, ...]:
    """Shared Q4_K/Q5_K path on super-blocks ``x`` [nb, 256]: (d, dmin float16 [nb], scale bytes [nb, 12],
    codes uint8 [nb, 256])."""
    nb = x.shape[0]
    sub = x.reshape(nb * 8, 32)
    av = np.sqrt(_seqsum(sub * sub) / f32(32))
    w = av[:, None] + np.abs(sub)
    scales, mins, L = _grid_min_search(sub, w, nmax, rmin, 0.1, nstep)
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale = scales.max(axis=1)
    max_min = mins.max(axis=1)
    inv_s = np.where(max_scale > 0, f32(63) / np.where(max_scale > 0, max_scale, f32(1)), f32(0))
    inv_m = np.where(max_min > 0, f32(63) / np.where(max_min > 0, max_min, f32(1)), f32(0))
    ls = np.minimum(63, _rint(inv_s[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, _rint(inv_m[:, None] * mins)).astype(np.uint8)
    d = _to_f16(max_scale / f32(63))
    dmin = _to_f16(max_min / f32(63))
    dd = d.astype(np.float32)[:, None] * ls.astype(np.float32)  # [nb, 8]
    dm = dmin.astype(np.float32)[:, None] * lm.astype(np.float32)
    nz = dd != 0
    q = np.clip(_rint((x.reshape(nb, 8, 32) + dm[..., None]) / np.where(nz, dd, f32(1))[..., None]), 0, nmax)
    L = np.where(nz[..., None], q, L).astype(np.uint8).reshape(nb, 256)
    return d, dmin, _pack_scales_k4(ls, lm), L


def _q4_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, L = _quantize_k_asym(x, 15, -1.0, 20)
    c = L.reshape(-1, 4, 2, 32)  # 64-value chunks: sub-block 2j low nibble, 2j+1 high
    qs = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), sc, qs], axis=1)


def _q5_k(x: np.ndarray) -> np.ndarray:
    d, dmin, sc, L = _quantize_k_asym(x, 31, -0.5, 15)
    c = L.reshape(-1, 4, 2, 32)
    qs = ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    hi = (L.reshape(-1, 8, 32) >> 4).astype(np.uint8)  # bit j of qh[l] = high bit of sub-block j, element l
    qh = np.zeros((L.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= hi[:, j] << j
    return np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), sc, qh, qs], axis=1)


def _grid_sym_search(x: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``x`` [n, 16]: the symmetric grid ``x ~ scale * (L - nmax)`` maximizing the ``x^2``-weighted
    fit over 19 candidate steps (llama.cpp's ``make_qx_quants``, rmse_type 1). Returns (scale [n], L [n, 16])."""
    n = x.shape[0]
    idx = np.abs(x).argmax(axis=1)  # first largest magnitude, as the reference's strict '>'
    mxv = x[np.arange(n), idx]
    zero = np.abs(mxv) < _EPS
    mxs = np.where(zero, f32(1), mxv)
    w = x * x

    def fit(iscale: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        l = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(np.float32)
        return l, _seqsum(w * x * lf), _seqsum(w * lf * lf)

    l, sumlx, suml2 = fit(f32(-nmax) / mxs)
    scale = np.where(suml2 != 0, sumlx / np.where(suml2 != 0, suml2, f32(1)), f32(0))
    best = scale * sumlx
    L = l
    for step in range(-9, 10):
        if step == 0:
            continue
        la, slx, sl2 = fit(-(f32(nmax) + f32(0.1) * f32(step)) / mxs)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        L = np.where(better[:, None], la, L)
        scale = np.where(better, slx / np.where(sl2 > 0, sl2, f32(1)), scale)
        best = np.where(better, scale * slx, best)
    scale = np.where(zero, f32(0), scale)
    L = np.where(zero[:, None], 0, L + nmax)
    return scale.astype(np.float32), L.astype(np.int32)


def _q6_k(x: np.ndarray) -> np.ndarray:
    nb = x.shape[0]
    scales, L = _grid_sym_search(x.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    idx = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), idx]
    empty = np.abs(max_scale) < _EPS
    iscale = f32(-128) / np.where(empty, f32(1), max_scale)
    d = _to_f16(np.where(empty, f32(0), f32(1) / iscale))
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
    dd = d.astype(np.float32)[:, None] * sc.astype(np.float32)
    nz = dd != 0
    q = np.clip(_rint(x.reshape(nb, 16, 16) / np.where(nz, dd, f32(1))[..., None]), -32, 31) + 32
    L = np.where(nz[..., None], q, L).reshape(nb, 256).astype(np.uint8)
    c = L.reshape(nb, 2, 4, 32)  # two 128-value halves, four 32-value quarters each
    ql = np.concatenate([(c[:, :, 0] & 0xF) | ((c[:, :, 2] & 0xF) << 4),
                         (c[:, :, 1] & 0xF) | ((c[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((c[:, :, 0] >> 4) | ((c[:, :, 1] >> 4) << 2) | ((c[:, :, 2] >> 4) << 4) | ((c[:, :, 3] >> 4) << 6))
    out = np.concatenate([ql, qh.reshape(nb, 64), sc.view(np.uint8), d.view(np.uint8).reshape(nb, 2)], axis=1)
    out[empty] = 0
    return out


_ENCODERS = {"Q4_K": _q4_k, "Q5_K": _q5_k, "Q6_K": _q6_k}


def quantize_kquant(data: np.ndarray, type_name: str, chunk_rows: int = 1024) -> np.ndarray:
    """float32 ``[rows, cols]`` (cols a multiple of 256) -> uint8 blocks ``[rows, cols / 256 * type_size]``."""
    if type_name not in _ENCODERS:
        raise SlimlmError(f"{type_name} is not a K-quant slimlm encodes (choose one of {', '.join(KQUANT_TYPES)})")
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim != 2 or data.shape[1] % QK_K:
        raise SlimlmError(f"{type_name} needs rows of whole 256-value blocks; got shape {tuple(data.shape)}")
    if not np.all(np.isfinite(data)):
        raise SlimlmError(f"cannot encode {type_name}: the tensor holds NaN or infinite values")
    rows, cols = data.shape
    out = np.empty((rows, cols // QK_K * TYPE_SIZE[type_name]), dtype=np.uint8)
    enc = _ENCODERS[type_name]
    for r in range(0, rows, chunk_rows):  # bounded temporaries (~40 floats per value inside the search)
        part = data[r:r + chunk_rows]
        out[r:r + part.shape[0]] = enc(part.reshape(-1, QK_K)).reshape(part.shape[0], -1)
    return out
