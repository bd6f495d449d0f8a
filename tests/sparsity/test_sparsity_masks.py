"""Mask selectors and SparseGPT on single layers: exact counts, N:M patterns, reconstruction error."""

from __future__ import annotations

import pytest
import torch

from slimlm.sparsity.masks import (
    accumulate_row_scalars,
    follows_n_m,
    make_row_scalars,
    mask_n_m,
    mask_per_layer,
    mask_per_row,
    parse_pattern,
    wanda_scores,
)
from slimlm.sparsity.sparsegpt import MinMaxQuantizer, accumulate_hessian, make_hessian, sparsegpt_prune
from slimlm.utils.errors import ConfigError


def _layer_and_inputs(out_f: int = 32, in_f: int = 64, tokens: int = 512, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    # correlated inputs with uneven channel scales: where activation-aware pruning matters
    mix = torch.randn(in_f, in_f, generator=g) * 0.3 + torch.eye(in_f)
    scales = torch.logspace(-1, 1, in_f)[torch.randperm(in_f, generator=g)]  # uneven, in no column order
    x = (torch.randn(tokens, in_f, generator=g) @ mix) * scales
    return w, x


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9])
def test_row_and_layer_masks_have_exact_counts(sparsity: float) -> None:
    s = torch.rand(16, 40)
    row = mask_per_row(s, sparsity)
    assert ((~row).sum(1) == int(40 * sparsity)).all()
    lay = mask_per_layer(s, sparsity)
    assert int((~lay).sum()) == int(16 * 40 * sparsity)
    # the pruned ones are the lowest scores: of the layer, and of each row (Wanda compares per output row)
    if sparsity:
        assert s[~lay].max() <= s[lay].min()
        for r in range(16):
            assert s[r][~row[r]].max() <= s[r][row[r]].min(), r


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_n_m_mask_keeps_exactly_n_of_m(n: int, m: int) -> None:
    s = torch.rand(8, 32)
    mask = mask_n_m(s, n, m)
    assert (mask.reshape(8, -1, m).sum(-1) == n).all()
    assert follows_n_m(s * mask, n, m)
    # the kept n of each m consecutive weights are that group's n largest scores
    groups = s.reshape(8, -1, m)
    nth = groups.sort(-1, descending=True).values[..., n - 1 : n]  # the n-th largest score of each group
    assert torch.equal(mask, (groups >= nth).reshape(8, 32))


def test_wanda_score_is_weight_times_input_norm() -> None:
    w, x = _layer_and_inputs(4, 6, 10)
    acc = make_row_scalars(6)
    accumulate_row_scalars(acc, x[:5])
    accumulate_row_scalars(acc, x[5:])
    expect = w.abs() * x.norm(dim=0).unsqueeze(0)
    assert torch.allclose(wanda_scores(w, acc), expect, rtol=1e-5)


@pytest.mark.parametrize("bad", ["4:4", "5:4", "0:4", "2-4", "a:b"])
def test_bad_patterns(bad: str) -> None:
    with pytest.raises(ConfigError):
        parse_pattern(bad)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_sparsity(bad: float) -> None:
    with pytest.raises(ConfigError):
        mask_per_row(torch.rand(2, 4), bad)


def _hessian(x: torch.Tensor, chunks: int = 4) -> torch.Tensor:
    h, n = make_hessian(x.shape[1]), 0
    for c in x.chunk(chunks):
        h, n = accumulate_hessian(h, n, c)
    return h


def _err(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ (w - w_hat).t()).norm())


@pytest.mark.parametrize("pattern", [None, (2, 4)])
def test_sparsegpt_beats_magnitude_and_wanda_on_output_error(pattern: tuple[int, int] | None) -> None:
    w, x = _layer_and_inputs()
    w_hat, keep = sparsegpt_prune(w, _hessian(x), 0.5, pattern, blocksize=32)
    acc = accumulate_row_scalars(make_row_scalars(64), x)
    if pattern:
        mag = w * mask_n_m(w.abs(), *pattern)
        wanda = w * mask_n_m(wanda_scores(w, acc), *pattern)
        assert follows_n_m(w_hat, *pattern)
    else:
        mag = w * mask_per_row(w.abs(), 0.5)
        wanda = w * mask_per_row(wanda_scores(w, acc), 0.5)
        assert int((~keep).sum()) == 32 * 64 // 2  # exact, block by block
    assert bool((w_hat[~keep] == 0).all())
    e_sgpt, e_wanda, e_mag = _err(w, w_hat, x), _err(w, wanda, x), _err(w, mag, x)
    assert e_sgpt < e_wanda < e_mag


def test_sparsegpt_zero_sparsity_keeps_the_weights() -> None:
    w, x = _layer_and_inputs()
    w_hat, keep = sparsegpt_prune(w, _hessian(x), 0.0)
    assert keep.all()
    assert torch.allclose(w_hat, w, atol=1e-5)


def test_joint_prune_quantize_is_on_grid_and_beats_prune_then_round() -> None:
    from slimlm.quant.primitives import choose_qparams, fake_quantize

    w, x = _layer_and_inputs()
    quant = MinMaxQuantizer(bits=4, group_size=32)
    w_hat, keep = sparsegpt_prune(w, _hessian(x), 0.5, None, blocksize=32, quantizer=quant)
    scales, zeros = torch.stack(quant.scales, 1), torch.stack(quant.zeros, 1)  # [out, 2]
    g = torch.arange(64) // 32
    q = w_hat / scales[:, g] + zeros[:, g]
    assert torch.allclose(q, q.round(), atol=1e-3)  # every weight on its group's grid
    assert bool((w_hat[~keep] == 0).all())
    # baseline: magnitude-prune then round to nearest on the same kind of grid
    mag = w * mask_per_row(w.abs(), 0.5)
    s, z = choose_qparams(mag, 4, group_size=32)
    base = fake_quantize(mag, s[:, g], z[:, g], 4)
    assert _err(w, w_hat, x) < _err(w, base, x)
