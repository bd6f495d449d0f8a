"""The one layer-by-layer calibration driver shared by every calibrated method.

Streams the calibration set through one decoder layer at a time (see :mod:`slimlm.calib.base` for
the protocol), so peak memory is about one layer plus the hidden states of the calibration set,
never the activations of the whole model. Each layer's outputs are recomputed *after* it was
compressed, so later layers calibrate on what the compressed model really produces.

Cost and memory, per layer: a capture pass stops each batch's forward as soon as every target
module of the pass has been fed (the rest of the layer is not needed: GPTQ's true-sequential
q/k/v group only runs the input norm), then one output pass overwrites the hidden states batch by
batch (one copy of them, not two). Freed heap pages are handed back to the OS after each layer, so
the process RSS shrinks as layers are compressed instead of keeping the fp32 weights' pages.

Compute dtype: ``compute_dtype=torch.bfloat16`` runs the layers' matmuls and attention in bf16
(``torch.autocast``) while the hidden states, norms and residual adds stay fp32 and the modules'
inputs reach the algorithm as fp32 (GPTQ's Hessians are accumulated in fp32 from them). That is the
reference GPTQ's own setting (its model runs in fp16 on the GPU), and 3-4x faster on CPUs with
native bf16 matmuls (AVX-512 BF16, AMX). :func:`resolve_calib_dtype` maps a config's ``"auto"``
to bf16 exactly there, fp32 elsewhere (emulated bf16 would be slower than fp32).

Example::

    samples = calibration_samples(lm.tokenizer, text, n_samples=128, seq_len=512)
    run_layerwise(lm.model, samples, GPTQAlgorithm(cfg), compute_dtype=resolve_calib_dtype("auto"))
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.calib.base import LayerwiseAlgorithm
from slimlm.models.transformer import Transformer
from slimlm.utils.cpu import has_native_bf16
from slimlm.utils.errors import ConfigError
from slimlm.utils.memory import release_free_memory

CALIB_DTYPES = ("auto", "fp32", "bf16")


def resolve_calib_dtype(name: str) -> torch.dtype:
    """``"fp32"`` / ``"bf16"`` as named; ``"auto"``: bf16 where the CPU multiplies bf16 natively
    (:func:`slimlm.utils.cpu.has_native_bf16`), else fp32."""
    if name not in CALIB_DTYPES:
        raise ConfigError(f"calib_dtype must be one of {', '.join(CALIB_DTYPES)}; got {name!r}")
    if name == "auto":
        return torch.bfloat16 if has_native_bf16() else torch.float32
    return torch.bfloat16 if name == "bf16" else torch.float32


def _stack(samples: Sequence[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Group equal-length samples into batches [b, T]."""
    flat = [s.reshape(1, -1) for s in samples]
    out: list[torch.Tensor] = []
    i = 0
    while i < len(flat):
        j = i + 1
        while j < len(flat) and j - i < batch_size and flat[j].shape[1] == flat[i].shape[1]:
            j += 1
        out.append(torch.cat(flat[i:j], 0))
        i = j
    return out


BATCH_TOKENS = 2048  # default batch: this many tokens (4 x 512); SmolLM2 GPTQ peaks ~100 MiB lower than at 8 x 512


@torch.no_grad()
def run_layerwise(model: Transformer, samples: Sequence[torch.Tensor], algorithm: LayerwiseAlgorithm,
                  batch_size: int | None = None, progress: bool = True, desc: str | None = None,
                  compute_dtype: torch.dtype = torch.float32) -> dict[str, float]:
    """Run ``algorithm`` over every decoder layer; returns timing stats.

    ``samples``: token id tensors ``[T]`` or ``[1, T]``. The model is modified in place.
    ``batch_size``: samples per forward (default: :data:`BATCH_TOKENS` tokens' worth); a batch's
    activations are the transient part of the peak memory. ``compute_dtype``: float32 (reference)
    or bfloat16 matmuls/attention in the layer forwards (see the module docstring).
    """
    if compute_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"run_layerwise: compute_dtype must be float32 or bfloat16, got {compute_dtype}")
    if not samples:
        raise ValueError("run_layerwise needs at least one calibration sample")
    model.config.check_positions(max(s.numel() for s in samples), "calibration sample length (--seq-len)")
    if batch_size is None:
        batch_size = max(1, BATCH_TOKENS // max(s.numel() for s in samples))
    batches = _stack(samples, batch_size)
    by_shape: dict[tuple[int, ...], Any] = {}  # one context (rotary tables) per batch shape
    ctxs: list[Any] = []
    hidden: list[torch.Tensor] = []
    for b in batches:
        pos = torch.arange(b.shape[1]).unsqueeze(0).expand(b.shape[0], -1)  # [b, T]
        if tuple(b.shape) not in by_shape:
            by_shape[tuple(b.shape)] = model.context(pos)
        ctxs.append(by_shape[tuple(b.shape)])
        hidden.append(model.embed(b, pos).float())  # [b, T, D]
    layers = model.model.layers
    full = bool(getattr(algorithm, "needs_full_forward", False))  # else captures stop early
    t0 = time.perf_counter()
    bar = tqdm(total=len(layers), desc=desc or f"{algorithm.name}: layers", unit="layer", disable=not progress,
               dynamic_ncols=True)
    def autocast() -> contextlib.AbstractContextManager[Any]:
        if compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast("cpu", dtype=compute_dtype)

    for idx, layer in enumerate(layers):
        groups = algorithm.target_groups(idx, layer)
        algorithm.begin_layer(idx, layer)
        if groups:
            if algorithm.sequential:
                for g in groups:
                    with autocast():
                        _capture(layer, g, algorithm, hidden, ctxs, full)
                    algorithm.finish_group(idx, layer, g)
            else:
                with autocast():
                    _capture(layer, [p for g in groups for p in g], algorithm, hidden, ctxs, full)
                for g in groups:
                    algorithm.finish_group(idx, layer, g)
        algorithm.end_layer(idx, layer)
        # quantized linears de-quantize once for all batches (pin_dense_weight), not once per batch
        pin = [f for m in layer.modules() if callable(f := getattr(m, "pin_dense_weight", None))]
        try:
            for f in pin:
                f(True)
            with autocast():
                for i, ctx in enumerate(ctxs):  # outputs of the compressed layer, replacing its inputs one by one
                    hidden[i].copy_(layer(hidden[i], ctx))  # in place: the long-lived buffers never move
        finally:
            for f in pin:
                f(False)
        release_free_memory()
        bar.update(1)
    bar.close()
    return {"seconds": time.perf_counter() - t0, "layers": float(len(layers)), "samples": float(len(samples))}


class _AllFed(Exception):
    """Raised by a capture hook once every target module has seen the batch: stops the forward there."""


def _capture(layer: nn.Module, paths: list[str], algorithm: LayerwiseAlgorithm, hidden: list[torch.Tensor],
             ctxs: list, full: bool = False) -> None:  # type: ignore[type-arg]
    """Run the calibration batches through ``layer`` feeding each target module's inputs to the algorithm.

    Each batch's forward stops right after the last target module was fed (modules that never run,
    e.g. unrouted experts, just let it finish), unless ``full`` (the algorithm hooks the layer's output).
    """
    handles = []
    waiting: set[str] = set()  # target modules not yet fed the current batch
    last: list[torch.Tensor] = []  # [input, its flat float view]: modules fed the same tensor (q/k/v,
    # gate/up) get the same object, so an algorithm can reuse work per input (GPTQ's x^T x)
    for path in paths:
        mod = layer.get_submodule(path)

        def hook(m: nn.Module, args: tuple, p: str = path) -> None:  # type: ignore[type-arg]
            x = args[0]
            if not last or last[0] is not x:
                last[:] = [x, x.reshape(-1, x.shape[-1]).float()]  # [tokens, in]
            with torch.autocast("cpu", enabled=False):  # the algorithm's math stays fp32 (Hessians)
                algorithm.accumulate(p, m, last[1])
            waiting.discard(p)
            if not waiting and not full:
                raise _AllFed

        handles.append(mod.register_forward_pre_hook(hook))
    try:
        for h, ctx in zip(hidden, ctxs, strict=True):
            waiting.update(paths)
            try:
                layer(h, ctx)
            except _AllFed:
                pass
    finally:
        last.clear()
        for hd in handles:
            hd.remove()
