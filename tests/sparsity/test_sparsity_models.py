"""Invariants over every pruning method on a tiny random llama (transformers from_config).

Each method: the requested sparsity / N:M pattern holds in every target, the model still runs,
saving + reloading reproduces the pruned logits exactly, and the checkpoint's linears shrink.
Structured pruning: smaller uniform config, reload and HF export match (transformers is the oracle).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.loaders.save import export_hf, save_model
from slimlm.models.modules import linear_weight
from slimlm.sparsity import PruneConfig, SparseLinear, prune_
from slimlm.sparsity.masks import follows_n_m
from slimlm.sparsity.structured import StructuredPruneConfig, structured_prune_
from slimlm.utils.errors import ConfigError, SlimlmError
from tests.sparsity.fixtures import probe, samples, tiny_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "hf", num_hidden_layers=2)


CASES = [("magnitude", ""), ("wanda", ""), ("sparsegpt", ""), ("magnitude", "2:4"), ("wanda", "4:8"),
         ("sparsegpt", "2:4")]


@pytest.mark.parametrize("method,pattern", CASES)
def test_every_method_prunes_exactly_and_reloads(hf_dir: Path, tmp_path: Path, method: str, pattern: str) -> None:
    lm = load_model(str(hf_dir))
    x = probe()
    dense = lm.model(x)
    report = prune_(lm.model, PruneConfig(method=method, sparsity=0.5, pattern=pattern, blocksize=32),
                    samples(), progress=False)
    mods = [m for m in lm.model.modules() if isinstance(m, SparseLinear)]
    assert len(mods) == 7 * 2 and len(report["modules"]) == 14
    for m in mods:
        w = m.dense_weight()
        if pattern:
            n, mm = (int(v) for v in pattern.split(":"))
            assert follows_n_m(w, n, mm)
        elif method == "sparsegpt":  # exact per block of 32 columns over all rows
            assert int((w != 0).sum()) == w.numel() // 2
        else:
            assert float((w == 0).float().mean()) == 0.5
    y = lm.model(x)
    assert not torch.allclose(y, dense)
    out = save_model(lm, tmp_path / "out")
    lm2 = load_model(str(out))
    assert torch.equal(lm2.model(x), y)
    info = json.loads((out / "slimlm.json").read_text())
    assert {e["kind"] for e in info["modules"].values()} == {"sparse"}
    stored = sum(t.numel() * t.element_size() for m in mods for t in m.state_dict().values())
    dense_bytes = sum(m.in_features * m.out_features * 4 for m in mods)
    assert stored < 0.6 * dense_bytes


def test_calibrated_methods_beat_magnitude_on_the_model_output(hf_dir: Path) -> None:
    lm0 = load_model(str(hf_dir))
    x = torch.cat(samples(4, 32, seed=5)).view(4, 32)
    ref = lm0.model(x)
    errs = {}
    for method in ("magnitude", "sparsegpt"):
        lm = load_model(str(hf_dir))
        prune_(lm.model, PruneConfig(method=method, sparsity=0.5, blocksize=32), samples(8), progress=False)
        errs[method] = float((lm.model(x) - ref).pow(2).mean())
    assert errs["sparsegpt"] < errs["magnitude"]


def test_joint_sparsegpt_4bit_saves_codes_and_reloads(hf_dir: Path, tmp_path: Path) -> None:
    lm = load_model(str(hf_dir))
    prune_(lm.model, PruneConfig(method="sparsegpt", sparsity=0.5, bits=4, group_size=32, blocksize=32),
           samples(), progress=False)
    x = probe()
    y = lm.model(x)
    out = save_model(lm, tmp_path / "w4")
    lm2 = load_model(str(out))
    assert torch.equal(lm2.model(x), y)
    m = lm2.model.model.layers[0].mlp.down_proj
    assert isinstance(m, SparseLinear) and m.bits == 4
    w = m.dense_weight()
    assert float((w == 0).float().mean()) >= 0.5
    assert len(torch.unique(w[0, :32])) <= 16 + 1  # one 4-bit grid per group (plus the pruned zeros)


def test_schedule_and_overrides(hf_dir: Path) -> None:
    lm = load_model(str(hf_dir))
    cfg = PruneConfig(method="magnitude", sparsity=0.5, schedule="linear", schedule_delta=0.2,
                      layer_sparsity={"layers.*.mlp.down_proj": 0.25}, ignore=["layers.0.self_attn.q_proj"],
                      storage="dense")
    rep = prune_(lm.model, cfg, None, progress=False)["modules"]
    assert "model.layers.0.self_attn.q_proj" not in rep
    assert rep["model.layers.0.self_attn.k_proj"]["target"] == pytest.approx(0.3)
    assert rep["model.layers.1.self_attn.k_proj"]["target"] == pytest.approx(0.7)
    assert rep["model.layers.1.mlp.down_proj"]["target"] == pytest.approx(0.25)
    w = linear_weight(lm.model.model.layers[1].mlp.down_proj)
    assert isinstance(lm.model.model.layers[1].mlp.down_proj, torch.nn.Linear)
    assert float((w == 0).float().mean()) == pytest.approx(0.25, abs=1e-3)


@pytest.mark.parametrize("kw", [dict(sparsity=1.0), dict(sparsity=-0.1), dict(pattern="4:4"),
                                dict(method="wanda", bits=4), dict(bits=9)])
def test_bad_configs(kw: dict) -> None:
    with pytest.raises(ConfigError):
        PruneConfig(**kw)


def test_calibrated_method_needs_samples(hf_dir: Path) -> None:
    lm = load_model(str(hf_dir))
    with pytest.raises(SlimlmError):
        prune_(lm.model, PruneConfig(method="wanda"), [], progress=False)


# --- structured -----------------------------------------------------------------------------------
def test_structured_pruning_is_a_smaller_normal_model(tmp_path: Path) -> None:
    hf = tiny_llama(tmp_path / "hf4", num_hidden_layers=4)
    lm = load_model(str(hf))
    before = lm.model.num_parameters()
    cfg = StructuredPruneConfig(remove_layers=1, kv_groups=1, intermediate_size=64)
    rep = structured_prune_(lm.model, cfg, samples(), progress=False)
    mc = lm.model.config
    assert (mc.num_hidden_layers, mc.num_key_value_heads, mc.num_attention_heads, mc.intermediate_size) == (3, 1, 2, 64)
    assert len(rep["plan"]["remove_layers"]) == 1
    assert lm.model.num_parameters() < before
    x = probe()
    y = lm.model(x)
    out = save_model(lm, tmp_path / "small")
    lm2 = load_model(str(out))
    assert torch.equal(lm2.model(x), y)
    hf_cfg = json.loads((out / "config.json").read_text())
    assert (hf_cfg["num_hidden_layers"], hf_cfg["num_key_value_heads"], hf_cfg["intermediate_size"]) == (3, 1, 64)
    # the HF export is a normal transformers model computing the same function
    from transformers import AutoModelForCausalLM

    exp = export_hf(lm2, tmp_path / "export")
    ref = AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(ref(x).logits, y, atol=1e-4)


def test_structured_target_ratio_and_layer_choice(tmp_path: Path) -> None:
    hf = tiny_llama(tmp_path / "hf4", num_hidden_layers=4)
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    lm = load_model(str(hf))
    rep = structured_prune_(lm.model, StructuredPruneConfig(target_ratio=0.8, layer_share=0.0), samples(),
                            progress=False)
    kept = sum(p.numel() for p in lm.model.parameters()) / hf_model.num_parameters()  # measured, not reported
    assert kept <= 0.8 and rep["ratio"] == pytest.approx(kept)
    assert rep["plan"]["remove_layers"] == []
    lm = load_model(str(hf))
    rep = structured_prune_(lm.model, StructuredPruneConfig(remove_layers=2), samples(), progress=False)
    # oracle: ShortGPT's block influence 1 - mean_token cos(h_in, h_out) of transformers' own decoder layers
    sums: dict[int, list[float]] = {}

    def hook(i: int):  # type: ignore[no-untyped-def]
        def f(mod, args, kwargs, out):  # type: ignore[no-untyped-def]
            h_in = (args[0] if args else kwargs["hidden_states"]).reshape(-1, 64)
            h_out = (out[0] if isinstance(out, tuple) else out).reshape(-1, 64)
            sums.setdefault(i, []).extend((1 - torch.nn.functional.cosine_similarity(h_in, h_out, dim=-1)).tolist())
        return f

    hooks = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(hf_model.model.layers)]
    with torch.no_grad():
        hf_model(torch.stack(samples()))
    for h in hooks:
        h.remove()
    bi_ref = {i: sum(v) / len(v) for i, v in sums.items()}
    assert len(bi_ref) == 4
    for i, v in bi_ref.items():
        assert rep["block_influence"][i] == pytest.approx(v, rel=1e-4, abs=1e-6), i
    assert rep["plan"]["remove_layers"] == sorted(sorted(bi_ref, key=bi_ref.__getitem__)[:2])  # least influential go


@pytest.mark.parametrize("kw", [dict(kv_groups=0), dict(intermediate_size=0), dict(target_ratio=1.0)])
def test_structured_bad_configs(kw: dict) -> None:
    with pytest.raises(ConfigError):
        StructuredPruneConfig(**kw)


def test_structured_cannot_remove_every_layer(hf_dir: Path) -> None:
    lm = load_model(str(hf_dir))
    with pytest.raises(SlimlmError, match="at least one"):
        structured_prune_(lm.model, StructuredPruneConfig(remove_layers=2), samples(), progress=False)
