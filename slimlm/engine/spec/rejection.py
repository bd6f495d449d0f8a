"""Modified rejection sampling for speculative decoding (Leviathan et al. 2023, Chen et al. 2023).

Why lossless: with draft tokens ``d_i ~ q_i`` and the target's distributions ``p_i`` (the same
temperature / top-k / top-p processing a plain step would apply), accepting ``d_i`` with probability
``min(1, p_i(d_i) / q_i(d_i))`` and, at the first rejection, drawing from ``norm(max(0, p_i - q_i))``
yields a token distributed exactly as ``p_i``; when every draft is accepted one more token comes from
``p_k`` (the bonus). A deterministic proposal (n-gram lookup) is the point mass ``q_i = 1[d_i]``: accept
with probability ``p_i(d_i)``, else draw from ``p_i`` with ``d_i`` removed. Greedy requests accept while
the draft equals the target's argmax, so their tokens equal plain greedy decoding.

tests/engine/test_speculative.py checks the sampled output's distribution against exact target
probabilities (chi-square) for both proposal kinds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def verify_greedy(target_logits: torch.Tensor, draft: Sequence[int]) -> list[int]:
    """target_logits: [k + 1, V] at the positions of (last token, d_1 .. d_k) -> the accepted drafts
    and the target's token after them (1 .. k + 1 tokens)."""
    best = target_logits.argmax(-1).tolist()
    out: list[int] = []
    for i, d in enumerate(draft):
        if d != best[i]:
            return out + [best[i]]
        out.append(d)
    return out + [best[len(draft)]]


def verify_sampled(p: torch.Tensor, draft: Sequence[int], q: torch.Tensor | None,
                   gen: torch.Generator | None) -> list[int]:
    """p: [k + 1, V] target probabilities, q: [k, V] the draft's (None: a deterministic proposal).
    Returns the accepted drafts and one more token drawn so that each follows ``p`` exactly."""
    k = len(draft)
    u = torch.rand(k, generator=gen, dtype=torch.float64).tolist()
    out: list[int] = []
    for i, d in enumerate(draft):
        pd = float(p[i, d])
        qd = 1.0 if q is None else float(q[i, d])
        if u[i] * qd < pd:  # accept with probability min(1, p / q)
            out.append(d)
            continue
        if q is None:
            resid = p[i].clone()
            resid[d] = 0.0
        else:
            resid = (p[i] - q[i]).clamp_min(0.0)
        total = float(resid.sum())
        if total <= 0.0:  # only by rounding (p == q); p itself is then the residual's limit
            resid, total = p[i], float(p[i].sum())
        return out + [int(torch.multinomial(resid / total, 1, generator=gen))]
    return out + [int(torch.multinomial(p[k], 1, generator=gen))]
