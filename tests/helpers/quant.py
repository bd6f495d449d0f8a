"""Random quantized weights for the tests of the quantized linears and their memory layouts.

``random_qw(out, inp, bits, group, symmetric)`` gives a :class:`QuantizedWeight` with uniform random codes,
scales in [0.001, 0.021) and (asymmetric) random zero points; ``act_order=True`` adds GPTQ's static-group
``g_idx`` under a random column order (each group keeps ``group`` members; the last may be short).
"""

from __future__ import annotations

import torch

from slimlm.quant.qtensor import QuantizedWeight


def random_qw(out: int, inp: int, bits: int, group: int, symmetric: bool, act_order: bool = False,
              seed: int = 0) -> QuantizedWeight:
    gen = torch.Generator().manual_seed(seed)
    ng = -(-inp // group)
    q = torch.randint(0, 2**bits, (out, inp), generator=gen).to(torch.uint8)  # [out, inp]
    scale = torch.rand(out, ng, generator=gen) * 0.02 + 0.001  # [out, ng]
    if symmetric:
        zero = torch.full((out, ng), 2 ** (bits - 1), dtype=torch.int32)
    else:
        zero = torch.randint(0, 2**bits, (out, ng), generator=gen).to(torch.int32)
    g_idx = None
    if act_order:  # column j belongs to group (its position in a random order) // group
        perm = torch.randperm(inp, generator=gen)
        g_idx = (torch.argsort(perm) // group).to(torch.int32)
    return QuantizedWeight(q, scale, zero, bits, group, symmetric, g_idx)
