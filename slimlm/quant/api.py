"""``quantize_(model, config, calib_samples)``: the one entry point of every quantization method.

The handler is looked up by the config's type (each method registers itself in
:mod:`slimlm.quant.methods`); calibrated methods (GPTQ, AWQ, SmoothQuant, LLM.int8()) stream
``calib_samples`` through the shared layer-by-layer driver. Every problem the input can cause
(bad group size for some module, missing calibration) is raised as a ConfigError *before* the
model is touched.

Example::

    from slimlm.quant import GPTQConfig, quantize_
    lm = load_model("smollm2-135m")
    samples = calibration_samples(lm.tokenizer, text, n_samples=128, seq_len=512)
    report = quantize_(lm.model, GPTQConfig(bits=4, group_size=128), samples)
    print(report.summary())
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from slimlm.quant.config import QuantConfigBase, WeightQuantConfig
from slimlm.quant.methods import methods
from slimlm.quant.primitives import resolve_group_size
from slimlm.quant.report import QuantReport, build_report
from slimlm.utils.config import BaseConfig, load_recipe
from slimlm.utils.errors import ConfigError


def method_names() -> list[str]:
    return sorted(methods())


def config_for_method(method: str, values: dict[str, Any] | None = None) -> QuantConfigBase:
    """Build the config of a method by name (``gptq``, ...) from a dict of field values."""
    entries = methods()
    if method not in entries:
        raise ConfigError(f"unknown quantization method {method!r}; known: {', '.join(sorted(entries))}")
    return entries[method].config_cls.from_dict(dict(values or {}))


def load_quant_recipe(path: str | Path) -> list[QuantConfigBase]:
    """Read a recipe (YAML/JSON) into quantization configs; each entry needs a known ``kind``."""
    out: list[QuantConfigBase] = []
    for entry in load_recipe(path):
        kind = entry.get("kind")
        if kind not in methods():
            raise ConfigError(f"recipe {path}: unknown quantization method {kind!r}; known: {', '.join(method_names())}")
        cfg = BaseConfig.load_any(entry)
        assert isinstance(cfg, QuantConfigBase)
        out.append(cfg)
    if not out:
        raise ConfigError(f"recipe {path} holds no configuration")
    return out


def needs_calibration(config: QuantConfigBase | Sequence[QuantConfigBase]) -> bool:
    cfgs = [config] if isinstance(config, QuantConfigBase) else list(config)
    return any(methods()[c.kind].calibrated for c in cfgs)


def check_model(model: nn.Module, config: QuantConfigBase) -> list[str]:
    """Paths of the linears ``config`` will quantize; raises ConfigError for a group size that does not fit."""
    paths = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:
            continue
        c = config.for_module(name)
        if c is None:
            continue
        if isinstance(c, WeightQuantConfig):
            resolve_group_size(m.in_features, c.group_size, name)
        paths.append(name)
    return paths


def quantize_(
    model: nn.Module,
    config: QuantConfigBase | Sequence[QuantConfigBase],
    calib_samples: Sequence[torch.Tensor] | None = None,
    progress: bool = False,
) -> QuantReport:
    """Quantize ``model`` in place with one config (or several, applied in order); returns the report.

    Args:
        model: a slimlm ``Transformer`` (``load_model(...).model``); plain modules work for
            non-calibrated methods (RTN, NF4).
        config: e.g. ``GPTQConfig(bits=4, group_size=128)``, or a list from a recipe.
        calib_samples: token id tensors ``[T]`` (see ``slimlm.calib.data.calibration_samples``);
            required by GPTQ, AWQ, SmoothQuant and LLM.int8().
        progress: show a tqdm bar (stderr) with an ETA.
    """
    cfgs = [config] if isinstance(config, QuantConfigBase) else list(config)
    entries = methods()
    for c in cfgs:
        if not isinstance(c, QuantConfigBase) or c.kind not in entries:
            raise ConfigError(f"not a quantization config: {c!r}; known methods: {', '.join(sorted(entries))}")
    if not cfgs:
        raise ConfigError("quantize_ needs at least one config")
    if any(entries[c.kind].calibrated for c in cfgs) and not calib_samples:
        names = [c.kind for c in cfgs if entries[c.kind].calibrated]
        raise ConfigError(f"{names[0]} needs calibration samples (pass calib_samples / --calib)")
    for c in cfgs[:1]:  # later stages see already-swapped modules, so only the first can be checked up front
        if not check_model(model, c):
            raise ConfigError(f"{c.kind}: no linear layer left to quantize (check 'ignore' and 'overrides')")
    t0 = time.perf_counter()
    with torch.no_grad():
        for c in cfgs:
            check_model(model, c)
            entries[c.kind].handler(model, c, calib_samples, progress)
    rep = build_report(model, method="+".join(c.kind for c in cfgs))
    rep.seconds = time.perf_counter() - t0
    rep.metrics["configs"] = [c.to_dict() for c in cfgs]
    return rep
