"""Chinchilla's parametric loss fit and the compute-optimal allocation under ``C = 6 N D``.

Hoffmann et al. 2022 (approach 3): ``L(N, D) = E + A / N^alpha + B / D^beta`` with E 1.69, A 406.4,
B 410.7, alpha 0.34, beta 0.28 (N parameters, D training tokens). Minimising L subject to
``6 N D = C`` (substitute ``D = C / (6 N)``, set dL/dN = 0):

    alpha A N^-alpha = beta B D^-beta   =>   N_opt = G (C/6)^a,  D_opt = (C/6)^b / G
    with  G = (alpha A / (beta B))^(1 / (alpha + beta)),  a = beta / (alpha + beta),  b = alpha / (alpha + beta).

Pure functions; ``tests/plan/test_chinchilla.py`` checks them against a numeric minimisation and the
paper's published allocations.
"""

from __future__ import annotations

from dataclasses import dataclass

from slimlm.utils.errors import SlimlmError


@dataclass(frozen=True)
class ChinchillaFit:
    E: float = 1.69
    A: float = 406.4
    B: float = 410.7
    alpha: float = 0.34
    beta: float = 0.28

    def loss(self, n_params: float, n_tokens: float) -> float:
        if n_params <= 0 or n_tokens <= 0:
            raise SlimlmError(f"parameters and tokens must be > 0, got N={n_params:g}, D={n_tokens:g}")
        return self.E + self.A / n_params**self.alpha + self.B / n_tokens**self.beta

    def optimal(self, flops: float) -> tuple[float, float]:
        """Loss-optimal ``(N, D)`` for a budget of ``flops`` (``6 N D = flops``)."""
        if not flops > 0:
            raise SlimlmError(f"the compute budget must be > 0 FLOPs, got {flops:g}")
        s = self.alpha + self.beta
        g = (self.alpha * self.A / (self.beta * self.B)) ** (1 / s)
        n = g * (flops / 6) ** (self.beta / s)
        return n, flops / (6 * n)


CHINCHILLA = ChinchillaFit()


def training_flops(n_params: float, n_tokens: float) -> float:
    return 6.0 * n_params * n_tokens
