"""Shared pieces of the interop tests: a tiny quantized slimlm model, its exact logits, and the logits of
the folder a consumer library loaded.

Why "exact" logits: slimlm's quantized linears take different paths by call size (docs/quant-formats.md):
<= 8 rows go through the decode kernels (int8-rounded activations), fewer than 256 fp32 rows through
torch's int4/int8 kernels (bf16 activations and bf16 int4 scales), larger fp32 calls de-quantize and run
an fp32 GEMM. An export is lossless when the consumer's logits equal slimlm's with every quantized
linear computed as ``x @ dense_weight().T`` in fp32 (``reference_forward``), which is what
:func:`exact_logits` runs; the tests also state how far slimlm's default (kernel) path is from that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from slimlm.loaders import load_model
from slimlm.quant.linear.base import QuantLinearBase
from tests.helpers.models import make_hf_model


def tiny_lm(tmp_path: Path, family: str = "llama", seed: int = 0) -> Any:
    """A tiny random HF model (transformers' from_config) loaded into slimlm in fp32."""
    make_hf_model(family, tmp_path / f"hf-{family}", seed=seed)
    return load_model(str(tmp_path / f"hf-{family}"))


def round_scales_to_f16(model: torch.nn.Module) -> None:
    """Re-build every weight-only quantized linear with float16-representable scales, so a format that
    stores float16 scales (GPTQ, GGUF blocks) holds the model exactly."""
    for name, m in list(model.named_modules()):
        to_q = getattr(type(m), "to_quantized", None)
        if isinstance(m, QuantLinearBase) and to_q is not None:
            qw = to_q(m)
            qw.scale = qw.scale.half().float()
            model.set_submodule(name, type(m).from_quantized(qw, bias=m.bias))


@contextmanager
def exact_linears(model: torch.nn.Module) -> Iterator[None]:
    """Within: every quantized linear's output is ``x @ dense_weight().T`` in fp32 (``reference_forward``)."""
    hooks = [m.register_forward_hook(lambda mod, args, out: mod.reference_forward(args[0]))
             for m in model.modules() if isinstance(m, QuantLinearBase)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def exact_logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """slimlm's logits with every quantized linear on its exact fp32 path (float32 out)."""
    with exact_linears(model), torch.no_grad():
        return model(ids).float()


def hf_logits(folder: Path, ids: torch.Tensor, **kw: Any) -> torch.Tensor:
    """Logits of ``folder`` loaded by ``transformers.AutoModelForCausalLM`` in fp32 on CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw).eval()
    with torch.no_grad():
        return model(ids).logits.float()


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b| (the logits' range)."""
    return float((a - b).abs().max() / b.abs().max())


def prompt(n: int = 16, vocab: int = 256, batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, n), generator=torch.Generator().manual_seed(seed))
