"""Low-rank factorization (plain and activation-aware SVD) and MHA -> GQA/MQA conversion.

Importing this package registers the ``lowrank`` linear kind so saved factorized models load.
"""

from slimlm.lowrank.factorize import FactorizeConfig, factorize_
from slimlm.lowrank.gqa import GQAConfig, convert_gqa_
from slimlm.lowrank.linear import LowRankLinear

__all__ = ["FactorizeConfig", "GQAConfig", "LowRankLinear", "convert_gqa_", "factorize_"]
