"""One shape for every transform (issue 17 item 10): one registry (duplicates refused), one typed config
base, one report type, one Hessian accumulator (checked against a transcription of the reference
``add_batch``), one meaning of ``group_size``, one module-pattern syntax.

Run: ``.venv/bin/python -m pytest tests/transforms/test_registry.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from slimlm.calib.hessian import HessianStore
from slimlm.loaders import load_model
from slimlm.lowrank import FactorizeConfig, GQAConfig
from slimlm.quant import RTNConfig
from slimlm.quant.report import QuantReport
from slimlm.sparsity import PruneConfig
from slimlm.sparsity.structured import StructuredPruneConfig
from slimlm.transforms import (
    TransformConfig,
    TransformReport,
    apply_transform,
    register_transform,
    transforms,
)
from slimlm.utils.errors import ConfigError
from tests.sparsity.fixtures import samples, tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("transforms"))


def test_every_command_family_is_in_the_one_registry() -> None:
    fam = {k: e.family for k, e in transforms().items()}
    assert {fam["rtn"], fam["gptq"], fam["awq"], fam["nf4"]} == {"quantize"}
    assert fam["prune"] == fam["prune-structured"] == "prune"
    assert fam["factorize"] == "factorize" and fam["convert-gqa"] == "convert-gqa"
    assert all(issubclass(e.config_cls, TransformConfig) for e in transforms().values())


def test_duplicate_name_is_refused() -> None:
    before = transforms()["prune"]

    @dataclass
    class Fake(TransformConfig):
        kind: ClassVar[str] = "prune"
        family: ClassVar[str] = "prune"

    with pytest.raises(ValueError, match="already registered"):
        register_transform(Fake, apply=lambda *a: TransformReport())
    assert transforms()["prune"] is before


@pytest.mark.parametrize("cfg", [
    RTNConfig(group_size=32), PruneConfig(method="magnitude"), PruneConfig(method="sparsegpt"),
    StructuredPruneConfig(kv_groups=1), FactorizeConfig(ratio=0.5), FactorizeConfig(ratio=0.5, activation_aware=True),
    GQAConfig(kv_heads=1), GQAConfig(kv_heads=1, weighting="activation"),
], ids=lambda c: c.kind)
def test_apply_returns_the_one_report_type(cfg: TransformConfig, tiny: Path) -> None:
    lm = load_model(str(tiny))
    report = apply_transform(lm.model, cfg, samples(2, 16))
    assert isinstance(report, TransformReport) and report.seconds > 0
    assert report.to_dict()["method"] == report.method and report.summary().startswith(report.method)
    if isinstance(cfg, RTNConfig):
        assert isinstance(report, QuantReport) and "model.layers.0.mlp.down_proj" in report.modules


def test_calibrated_config_without_samples_is_a_config_error(tiny: Path) -> None:
    lm = load_model(str(tiny))
    with pytest.raises(ConfigError, match="calibration"):
        apply_transform(lm.model, FactorizeConfig(activation_aware=True))


# --- one Hessian ------------------------------------------------------------------------------------
def reference_add_batch(batches: list[torch.Tensor]) -> tuple[torch.Tensor, int]:
    """GPTQ/SparseGPT ``add_batch`` as the reference code writes it: inp ``[batch, seq, in]``, nsamples
    counts sequences, H the running mean of ``2/nsamples * sum over all tokens x x^T``."""
    h, ns = torch.zeros(batches[0].shape[-1], batches[0].shape[-1], dtype=torch.float64), 0
    for inp in batches:
        tmp = inp.shape[0]
        x = inp.reshape(-1, inp.shape[-1]).t().double()
        h *= ns / (ns + tmp)
        ns += tmp
        x = math.sqrt(2 / ns) * x
        h += x @ x.t()
    return h, ns


def test_one_accumulator_matches_the_reference_weighting() -> None:
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(16, 24, generator=g) for _ in range(7)]
    batches = [torch.stack(seqs[:3]), torch.stack(seqs[3:6]), torch.stack(seqs[6:])]  # 3 + 3 + 1: a short last batch
    ref, ns = reference_add_batch(batches)
    store = HessianStore(torch.float64)
    for b in batches:
        store.add("p", b.reshape(-1, 24))  # the driver's [tokens, in] view
    h = store.pop("p")
    assert h is not None
    tokens_per_sample = 16
    assert torch.allclose(h * tokens_per_sample, ref, rtol=1e-6, atol=1e-6)  # same H up to the constant T (x^T x in fp32)


def test_sparsegpt_takes_the_shared_accumulator() -> None:
    # SparseGPT's re-exported functions are the one accumulator: n counts tokens, H = 2/n X^T X
    from slimlm.sparsity.sparsegpt import accumulate_hessian, make_hessian

    x = torch.randn(128, 12, generator=torch.Generator().manual_seed(3))
    h, n = make_hessian(12), 0
    for c in (x[:100], x[100:]):
        h, n = accumulate_hessian(h, n, c)
    assert n == 128 and torch.allclose(h, 2 * x.t() @ x / 128, rtol=1e-5, atol=1e-6)


def test_sparsegpt_does_not_depend_on_how_samples_are_batched(tiny: Path) -> None:
    # 5 samples in batches of 2 (2+2+1) or of 5: same tokens, same Hessians -> the same pruned model
    from slimlm.sparsity import prune_

    out = []
    for bs in (2, 5):
        lm = load_model(str(tiny))
        prune_(lm.model, PruneConfig(method="sparsegpt", storage="dense"), samples(5, 16), progress=False,
               batch_size=bs)
        out.append(lm.model.model.layers[2].mlp.down_proj.weight.detach().clone())
    assert torch.equal(out[0] == 0, out[1] == 0) and torch.allclose(out[0], out[1], atol=1e-4)


# --- one group_size meaning, one pattern syntax --------------------------------------------------------
def test_prune_group_size_means_what_it_means_in_quantization(tiny: Path) -> None:
    from slimlm.sparsity import prune_

    for gs in (-1, 0):
        lm = load_model(str(tiny))
        prune_(lm.model, PruneConfig(method="sparsegpt", bits=4, group_size=gs, sparsity=0.5), samples(2, 16),
               progress=False)
        mod = lm.model.model.layers[0].mlp.up_proj
        scale = mod.scales  # [out, 1]
        assert scale.shape[1] == 1
        if gs == 0:  # per tensor: one scale for the whole matrix
            assert torch.all(scale == scale[0, 0])
        else:
            assert len(torch.unique(scale)) > 1
    # version-1 configs meant per row by 0: migrated
    assert PruneConfig.from_dict({"version": 1, "method": "sparsegpt", "bits": 4, "group_size": 0}).group_size == -1


def test_one_pattern_syntax_for_ignore(tiny: Path) -> None:
    from slimlm.lowrank import factorize_
    from slimlm.sparsity import prune_

    lm = load_model(str(tiny))
    rep = prune_(lm.model, PruneConfig(method="magnitude", ignore=["re:layers\\.0\\.", "model.layers.1.mlp.*"]),
                 progress=False)
    assert not any(p.startswith("model.layers.0.") or p.startswith("model.layers.1.mlp.") for p in rep.modules)
    assert "model.layers.1.self_attn.q_proj" in rep.modules
    lm = load_model(str(tiny))
    rep = factorize_(lm.model, FactorizeConfig(ratio=0.5, ignore=["model.layers.2.*", "down_proj"]), progress=False)
    assert not any(p.startswith("model.layers.2.") or p.endswith("down_proj") for p in rep.modules)
    assert "model.layers.0.mlp.up_proj" in rep.modules
    for cls in (PruneConfig, FactorizeConfig, RTNConfig):
        with pytest.raises(ConfigError, match="bad regex"):
            cls(ignore=["re:("])


def test_every_numeric_field_declares_its_range() -> None:
    # the {"min"|"gt", "max"|"lt"} metadata the CLI and from_dict enforce (slimlm.utils.config)
    import dataclasses
    import typing

    for name, entry in transforms().items():
        hints = typing.get_type_hints(entry.config_cls)
        for f in dataclasses.fields(entry.config_cls):
            if hints[f.name] in (int, float):
                assert "min" in f.metadata or "gt" in f.metadata, f"{name}.{f.name} has no lower bound"
                lo = f.metadata.get("min", f.metadata.get("gt"))
                hi = f.metadata.get("max", f.metadata.get("lt", math.inf))
                assert lo <= f.default <= hi, f"{name}.{f.name}: default {f.default} outside [{lo}, {hi}]"
