"""The planner: memory, speed and compute of a task predicted before anything runs (``slimlm plan``).

- :mod:`slimlm.plan.shapes`: a model's shapes from its config / GGUF header (no weight read)
- :mod:`slimlm.plan.formats`: resident weight bytes per storage format
- :mod:`slimlm.plan.memory`: KV cache, activations, gradients, optimizer states, calibration
- :mod:`slimlm.plan.roofline`: this CPU's measured bandwidth / GEMM rate / efficiencies (cached)
- :mod:`slimlm.plan.chinchilla`: the Chinchilla loss fit and compute-optimal N, D
- :mod:`slimlm.plan.planner`: one task's plan as a dict

Example::

    from slimlm.plan import PlanConfig, plan, read_shape
    print(plan(read_shape("smollm2-135m"), PlanConfig(task="inference", context=2048), roof=None))

Docs: docs/plan.md. Tests: ``.venv/bin/python -m pytest tests/plan``.
"""

from slimlm.plan.planner import PlanConfig, plan
from slimlm.plan.shapes import read_shape

__all__ = ["PlanConfig", "plan", "read_shape"]
