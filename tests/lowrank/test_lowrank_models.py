"""Factorization and GQA conversion on a tiny random llama; CLI contract for the three commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slimlm.cli.main import main
from slimlm.loaders import load_model
from slimlm.loaders.save import export_hf, save_model
from slimlm.lowrank import FactorizeConfig, GQAConfig, LowRankLinear, convert_gqa_, factorize_
from slimlm.utils.errors import SlimlmError
from tests.sparsity.fixtures import calib_text_file, probe, samples, tiny_llama


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # MHA (4 KV heads) so GQA conversion has something to merge
    return tiny_llama(tmp_path_factory.mktemp("tiny") / "hf", num_hidden_layers=2, num_key_value_heads=4)


@pytest.mark.parametrize("aware", [False, True])
def test_factorize_reduces_parameters_and_reloads(hf_dir: Path, tmp_path: Path, aware: bool) -> None:
    lm = load_model(str(hf_dir))
    x = probe()
    before = sum(p.numel() for p in lm.model.parameters())  # untied: every tensor counted once
    rep = factorize_(lm.model, FactorizeConfig(ratio=0.5, activation_aware=aware), samples(), progress=False)
    mods = [m for m in lm.model.modules() if isinstance(m, LowRankLinear)]
    assert len(mods) == 14
    for m in mods:
        assert m.rank * (m.in_features + m.out_features) <= 0.5 * m.in_features * m.out_features
    # the report's counts are the measured ones: each in x out matrix became rank x (in + out)
    after = before - sum(m.in_features * m.out_features - m.rank * (m.in_features + m.out_features) for m in mods)
    assert sum(p.numel() for p in lm.model.parameters()) == after
    assert (rep["parameters_before"], rep["parameters_after"]) == (before, after) and after < before
    y = lm.model(x)
    out = save_model(lm, tmp_path / "f")
    assert torch.equal(load_model(str(out)).model(x), y)


def test_activation_aware_is_closer_on_the_calibration_inputs(hf_dir: Path) -> None:
    ref_lm = load_model(str(hf_dir))
    x = torch.stack(samples(4, 32))
    ref = ref_lm.model(x)
    err = {}
    for aware in (False, True):
        lm = load_model(str(hf_dir))
        factorize_(lm.model, FactorizeConfig(ratio=0.5, activation_aware=aware), samples(4, 32), progress=False)
        err[aware] = float((lm.model(x) - ref).pow(2).mean())
    assert err[True] < err[False]


def test_full_rank_factorization_keeps_the_logits(hf_dir: Path) -> None:
    lm = load_model(str(hf_dir))
    x = probe()
    ref = lm.model(x)
    factorize_(lm.model, FactorizeConfig(rank=64, targets=["self_attn.q_proj", "self_attn.o_proj"]), progress=False)
    assert torch.allclose(lm.model(x), ref, atol=1e-4)


def test_gqa_identity_and_exact_merge_of_equal_heads(hf_dir: Path) -> None:
    lm = load_model(str(hf_dir))
    x = probe()
    ref = lm.model(x)
    convert_gqa_(lm.model, GQAConfig(kv_heads=4), progress=False)
    assert torch.allclose(lm.model(x), ref, atol=1e-6)
    # make KV heads pairwise equal: merging to 2 groups must then be exact
    for layer in lm.model.model.layers:
        for name in ("k_proj", "v_proj"):
            w = getattr(layer.self_attn, name).weight.data.view(4, 16, -1)
            w[1], w[3] = w[0].clone(), w[2].clone()
    ref2 = lm.model(x)
    rep = convert_gqa_(lm.model, GQAConfig(kv_heads=2), progress=False)
    assert rep["kv_cache_ratio"] == 0.5 and lm.model.config.num_key_value_heads == 2
    for layer in lm.model.model.layers:  # the cache really halves: k and v project to 2 heads of 16
        assert layer.self_attn.k_proj.out_features == layer.self_attn.v_proj.out_features == 2 * 16
    assert torch.allclose(lm.model(x), ref2, atol=1e-5)


@pytest.mark.parametrize("weighting", ["uniform", "activation"])
def test_gqa_to_mqa_saves_and_exports(hf_dir: Path, tmp_path: Path, weighting: str) -> None:
    lm = load_model(str(hf_dir))
    x = probe()
    convert_gqa_(lm.model, GQAConfig(kv_heads=1, weighting=weighting), samples(), progress=False)
    assert lm.model.model.layers[0].self_attn.k_proj.out_features == 16
    y = lm.model(x)
    out = save_model(lm, tmp_path / "mqa")
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1
    assert torch.equal(load_model(str(out)).model(x), y)
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(export_hf(lm, tmp_path / "hf"), dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.allclose(ref(x).logits, y, atol=1e-4)


def test_gqa_group_count_must_divide_heads(hf_dir: Path) -> None:
    lm = load_model(str(hf_dir))
    with pytest.raises(SlimlmError, match="divide"):
        convert_gqa_(lm.model, GQAConfig(kv_heads=3), progress=False)


# --- CLI --------------------------------------------------------------------------------------------
def test_cli_commands_write_loadable_models(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    calib = calib_text_file(tmp_path)
    common = ["--calib", str(calib), "--calib-samples", "2", "--calib-seq-len", "32", "--no-progress", "--json"]
    runs = {
        "wanda24": ["prune", str(hf_dir), "--method", "wanda", "--pattern", "2:4"],
        "struct": ["prune", str(hf_dir), "--structured", "--kv-groups", "2", "--intermediate-size", "64"],
        "asvd": ["factorize", str(hf_dir), "--ratio", "0.5", "--activation-aware"],
        "mqa": ["convert-gqa", str(hf_dir), "--kv-heads", "1"],
    }
    for name, argv in runs.items():
        assert main([*argv, *common, "--out", str(tmp_path / name)]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        lm = load_model(str(tmp_path / name))
        assert lm.model.num_parameters() == out["parameters"]
    assert load_model(str(tmp_path / "struct")).config.intermediate_size == 64


@pytest.mark.parametrize("argv,msg", [
    (["prune", "{m}", "--sparsity", "1.0"], "argument --sparsity: expects a number in [0, 1)"),
    (["prune", "{m}", "--pattern", "4:4"], "N < M"),
    (["factorize", "{m}", "--rank", "65"], "rank 65"),
    (["convert-gqa", "{m}", "--kv-heads", "3"], "does not divide"),
    (["prune", "{m}", "--structured", "--kv-groups", "0"], "all attention heads"),
    (["prune", "{m}", "--method", "wanda", "--calib", "/nonexistent.txt"], "not found"),
])
def test_cli_errors_are_one_line_and_write_nothing(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   argv: list[str], msg: str) -> None:
    out = tmp_path / "out"
    rc = main([a.replace("{m}", str(hf_dir)) for a in argv] + ["--out", str(out), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and msg in err[-1]
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_cli_dry_run_writes_nothing(hf_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dry"
    assert main(["prune", str(hf_dir), "--method", "sparsegpt", "--calib", "builtin:pydoc", "--dry-run", "--json",
                 "--out", str(out)]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["modules_to_prune"] == 14
    assert not out.exists()


def test_recipe_runs_and_foreign_stage_is_rejected(hf_dir: Path, tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[2]
    recipe = repo / "recipes" / "prune-magnitude-2of4.yaml"
    assert main(["prune", str(hf_dir), "--recipe", str(recipe), "--out", str(tmp_path / "r"), "--no-progress"]) == 0
    assert load_model(str(tmp_path / "r")).meta["recipe"][0]["pattern"] == "2:4"
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: factorize\nratio: 0.5\n")
    with pytest.raises(SlimlmError, match="factorize"):
        from argparse import Namespace

        from slimlm.cli.prune import recipe_config
        from slimlm.sparsity import PruneConfig

        recipe_config(Namespace(recipe=str(bad)), {"prune": PruneConfig})
