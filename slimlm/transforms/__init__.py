"""One shape for every model transform: registry, typed config base, report type, module patterns.

Example::

    from slimlm.transforms import apply_transform, transforms
    from slimlm.sparsity import PruneConfig
    report = apply_transform(lm.model, PruneConfig(method="magnitude", sparsity=0.5))
    print(sorted(transforms("quantize")))  # ['awq', 'gptq', 'int8-outlier', 'nf4', 'rtn', 'smoothquant']

The calibration data of calibrated transforms is streamed by the one driver
(:func:`slimlm.calib.driver.run_layerwise`); their Gram/Hessian statistics come from
:mod:`slimlm.calib.hessian`.
"""

from slimlm.transforms.config import TransformConfig
from slimlm.transforms.registry import (
    TransformEntry,
    apply_transform,
    get_transform,
    register_transform,
    transforms,
)
from slimlm.transforms.report import TransformReport
from slimlm.transforms.select import matches_any, path_matches

__all__ = [
    "TransformConfig", "TransformEntry", "TransformReport", "apply_transform", "get_transform", "matches_any",
    "path_matches", "register_transform", "transforms",
]  # fmt: skip
