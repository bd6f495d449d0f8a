"""GPTQ exports loaded by ``transformers.AutoModelForCausalLM`` with the GPTQModel backend on CPU.

The backend: ``gptqmodel==5.8.0`` + ``optimum==2.2.0`` (transformers 5.23 needs both). Every gptqmodel
release pins ``numpy==2.2.6`` (slimlm pins 2.4.6) and 7.x imports torchvision, whose PyPI wheels need
CUDA torch; so 5.8.0 and its pure-Python dependencies are installed with ``--no-deps
--no-build-isolation`` (Makefile). The model is quantized with float16-representable scales, so the
file (float16 ``scales``) holds it exactly. Tolerances, against slimlm's logits:

- ``backend="torch"`` (``TorchQuantLinear``, any bits): de-quantizes as ``scales * (q - zero)`` in
  float16, then an fp32 matmul: 1e-3 of the logits' range against slimlm's exact fp32 logits (measured
  3e-4; the float16 product rounds the weights).
- the default CPU kernel for 4 bits (``TorchFusedQuantLinear``): torch's int4 kernel with bf16
  activations, the same call as slimlm's runtime: equal to slimlm's default forward to 1e-6
  (measured 0.0). It replaces the zero points by zeros (gptqmodel 5.8 and 7.4 ``transform_cpu``), so
  asymmetric 4-bit files are only right with ``backend="torch"`` (docs/quant-formats.md).

A layout error moves logits by far more (tested: the v1 file read as v2).
Run: ``.venv/bin/pytest tests/interop/test_gptq.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimlm.quant import RTNConfig, quantize_
from slimlm.quant.export import export_gptq, split_model
from tests.interop.common import exact_logits, hf_logits, max_rel_diff, prompt, round_scales_to_f16, tiny_lm

pytest.importorskip("gptqmodel", reason="GPTQ backend not installed (Makefile installs gptqmodel==5.8.0)")
pytest.importorskip("optimum", reason="optimum not installed (Makefile installs optimum==2.2.0)")

TOL = 1e-3


def _export(tmp_path: Path, bits: int, group: int, sym: bool, fmt: str) -> tuple[object, Path]:
    lm = tiny_lm(tmp_path)
    quantize_(lm.model, RTNConfig(bits=bits, group_size=group, symmetric=sym))
    round_scales_to_f16(lm.model)
    return lm, export_gptq(split_model(lm.model), tmp_path / "gptq", checkpoint_format=fmt)


def _torch_backend(bits: int) -> dict[str, object]:
    from transformers import GPTQConfig

    return {"quantization_config": GPTQConfig(bits=bits, backend="torch")}


@pytest.mark.parametrize("bits,group,sym,fmt", [(4, 32, True, "gptq"), (4, 32, False, "gptq"),
                                                (8, 64, False, "gptq_v2"), (2, 32, False, "gptq")])
def test_gptq_export_loads_in_transformers(bits: int, group: int, sym: bool, fmt: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # gptqmodel writes an offload folder in the working directory
    lm, out = _export(tmp_path, bits, group, sym, fmt)
    ids = prompt()
    got = hf_logits(out, ids, **_torch_backend(bits))
    assert max_rel_diff(got, exact_logits(lm.model, ids)) <= TOL  # type: ignore[attr-defined]


def test_gptq_default_cpu_kernel_equals_slimlm_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """4-bit symmetric with gptqmodel's default CPU kernel: the same int4 call as slimlm's runtime when
    slimlm's own kernels are off (SLIMLM_KERNELS=0: the int4 linear then holds torch's int4 layout)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SLIMLM_KERNELS", "0")
    lm, out = _export(tmp_path, 4, 32, True, "gptq")
    ids = prompt()
    with torch.no_grad():
        ref = lm.model(ids).float()  # type: ignore[attr-defined]
    assert max_rel_diff(hf_logits(out, ids), ref) <= 1e-6


def test_gptq_zero_convention_matters(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tolerance above catches a layout error: a v1 file (zero - 1) declared as v2 is read wrongly."""
    monkeypatch.chdir(tmp_path)
    lm, out = _export(tmp_path, 4, 32, False, "gptq")
    for name in ("config.json", "quantize_config.json"):
        cfg = json.loads((out / name).read_text())
        (cfg.get("quantization_config") or cfg)["checkpoint_format"] = "gptq_v2"
        (out / name).write_text(json.dumps(cfg))
    ids = prompt()
    got = hf_logits(out, ids, **_torch_backend(4))
    assert max_rel_diff(got, exact_logits(lm.model, ids)) > 10 * TOL  # type: ignore[attr-defined]
