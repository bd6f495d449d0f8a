"""The one report type every transform returns (``quantize_``, ``prune_``, ``factorize_``, ...).

``method`` names what ran (config kind, or the method inside it: ``gptq``, ``sparsegpt``,
``gptq+rtn`` for a chain), ``seconds`` the wall time, ``modules`` per-module facts keyed by full
module path, ``metrics`` whole-model numbers (``mean_sparsity``, ``ratio``, ``kv_cache_ratio``, ...).
``to_dict()`` is the JSON the CLI prints; ``report["key"]`` reads the same dictionary.
Quantization's :class:`slimlm.quant.report.QuantReport` extends it with stored-bit accounting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TransformReport:
    method: str = ""
    seconds: float = 0.0
    modules: dict[str, dict[str, Any]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "seconds": self.seconds, **self.metrics, "modules": self.modules}

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def summary(self) -> str:
        """One line: the method, its whole-model metrics and the time."""
        parts = [f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in self.metrics.items()
                 if isinstance(v, (int, float, str))]
        return f"{self.method}: " + ", ".join(parts + [f"{len(self.modules)} modules", f"{self.seconds:.1f}s"])
