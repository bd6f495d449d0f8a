"""Post-training quantization: primitives, methods (RTN, GPTQ, AWQ, SmoothQuant, LLM.int8(), NF4),
and the one entry point :func:`quantize_`. See ``docs/quantization.md``."""

from slimlm.quant.api import config_for_method, load_quant_recipe, method_names, needs_calibration, quantize_
from slimlm.quant.config import QuantConfigBase, WeightQuantConfig
from slimlm.quant.methods import (
    AWQConfig,
    GPTQConfig,
    Int8OutlierConfig,
    NF4Config,
    RTNConfig,
    SmoothQuantConfig,
)
from slimlm.quant.qtensor import QuantizedWeight
from slimlm.quant.report import QuantReport, build_report

__all__ = [
    "AWQConfig", "GPTQConfig", "Int8OutlierConfig", "NF4Config", "QuantConfigBase", "QuantReport",
    "QuantizedWeight", "RTNConfig", "SmoothQuantConfig", "WeightQuantConfig", "build_report",
    "config_for_method", "load_quant_recipe", "method_names", "needs_calibration", "quantize_",
]  # fmt: skip
