"""Adafactor (Shazeer & Stern 2018): factored second moments, a row and a column vector per matrix
instead of a full tensor, no first moment, relative step size ``min(lr, 1/sqrt(t))`` scaled by the
parameter's RMS, update clipping at ``d``. Memory per (n x m) matrix: n + m floats.

torch's ``torch.optim.Adafactor`` implements exactly this algorithm (the paper's beta1 = 0 variant with
``beta2_t = 1 - t^beta2_decay``), so it is registered as is: its keyword arguments (``lr`` = the relative
step cap, ``beta2_decay``, ``eps``, ``d``, ``weight_decay``) pass through.
``build_optimizer("adafactor", model.parameters(), lr=1e-2)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from slimlm.train.optim import register_optimizer


@register_optimizer("adafactor")
def _adafactor(params: Iterable[Any], **kwargs: Any) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(params, **kwargs)
