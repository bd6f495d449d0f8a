"""peft 0.21 beside an old gptqmodel: hide gptqmodel from peft where no GPTQ layer is used.

peft raises ImportError on every layer it inspects when a gptqmodel older than 7 is importable, and
the GPTQ oracle of tests/interop (gptqmodel 5.8.0, installed by the Makefile) is one. The peft tests, the
bench adapter test and ``benchmarks/finetune.py`` use no GPTQ layers, so they tell peft it is absent.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

PEFT_MODULES = ("peft.import_utils", "peft.tuners.lora.gptq", "peft.tuners.lora.awq", "peft.utils.other",
                "peft.utils.quantization_utils")  # each binds its own name is_gptqmodel_available


def hide_old_gptqmodel(set_attr: Callable[[Any, str, Any], None] = setattr) -> None:
    """``set_attr``: ``monkeypatch.setattr`` in a test (undone after it), plain ``setattr`` in a script."""
    for name in PEFT_MODULES:
        mod = importlib.import_module(name)
        if hasattr(mod, "is_gptqmodel_available"):
            set_attr(mod, "is_gptqmodel_available", lambda: False)
