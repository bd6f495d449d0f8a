"""Quantization methods: importing this package registers every method's config and handler."""

from slimlm.quant.methods import awq, gptq, int8_outlier, nf4, rtn, smoothquant  # noqa: F401
from slimlm.quant.methods.awq import AWQConfig
from slimlm.quant.methods.base import methods, register_method
from slimlm.quant.methods.gptq import GPTQConfig
from slimlm.quant.methods.int8_outlier import Int8OutlierConfig
from slimlm.quant.methods.nf4 import NF4Config
from slimlm.quant.methods.rtn import RTNConfig
from slimlm.quant.methods.smoothquant import SmoothQuantConfig

__all__ = [
    "AWQConfig", "GPTQConfig", "Int8OutlierConfig", "NF4Config", "RTNConfig", "SmoothQuantConfig",
    "methods", "register_method",
]  # fmt: skip
