"""slimlm bench on a tiny random model: schema-valid files, identical perplexities across runs
(checked against transformers), a failing variant recorded while the rest go on, memory facts from
the HF config, interleaved rounds, appending, and bad input.

The two bench runs (fp32, bf16 and a variant that cannot load, each in its own worker process) take
about a minute on a loaded 2-core machine. Run: ``.venv/bin/python -m pytest tests/bench``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from slimlm.bench.protocol import Variant
from slimlm.bench.results import SCHEMA_PATH, read_results, validation_errors
from slimlm.bench.timing import interleave, summarize
from slimlm.cli.main import main
from slimlm.utils.errors import SlimlmError
from tests.helpers.models import make_hf_model
from tests.helpers.peft_env import hide_old_gptqmodel
from tests.helpers.tokenizers import make_tiny_tokenizer

SEQ, MAXTOK, REPEATS = 32, 128, 2
SMALL = ["--seq-len", str(SEQ), "--max-tokens", str(MAXTOK), "--prompt-tokens", "8", "--new-tokens", "4",
         "--repeats", str(REPEATS), "--warmup", "1", "--concurrency", "2", "--threads", "1", "--no-progress"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    make_hf_model("llama", d, vocab_size=384, max_position_embeddings=128)
    make_tiny_tokenizer(vocab_size=384).save(d)
    return d


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("data") / "story.txt"
    p.write_text("The quick brown fox jumps over the lazy dog while the cat sleeps in the sun. " * 40)
    return p


@pytest.fixture(scope="module")
def adapter(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter with random A and B (so it changes the logits), in peft's layout."""
    from slimlm.loaders import load_model
    from slimlm.peft import LoraConfig, apply_peft, save_adapter

    lm = load_model(str(tiny))
    torch.manual_seed(0)
    apply_peft(lm.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="random"))
    return save_adapter(lm.model, tmp_path_factory.mktemp("adapter") / "lora1", str(tiny))


@pytest.fixture(scope="module")
def two_runs(tiny: Path, corpus: Path, adapter: Path,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("res") / "results.json"
    # the corpus itself as a "model": neither a GGUF file nor a model folder, so it fails to load
    argv = ["bench", f"tiny={tiny}", f"bf16={tiny},dtype=bf16", f"broken={corpus}", f"lora={tiny},adapter={adapter}",
            "--data", str(corpus),
            "--out", str(out), *SMALL]
    assert main(argv + ["--machine-name", "first"]) == 0
    assert main(argv + ["--machine-name", "second"]) == 0
    return out, json.loads(out.read_text())


def _variant(run: dict[str, Any], label: str) -> dict[str, Any]:
    return next(v for v in run["variants"] if v["label"] == label)


@pytest.mark.slow
def test_results_match_the_schema(two_runs: tuple[Path, dict[str, Any]]) -> None:
    import jsonschema

    path, obj = two_runs
    jsonschema.validate(obj, json.loads(SCHEMA_PATH.read_text()))  # the oracle: jsonschema itself
    assert validation_errors(obj) == []
    assert read_results(path) == obj
    assert [r["machine"]["name"] for r in obj["runs"]] == ["first", "second"]  # appended, in order
    cmd = obj["runs"][1]["command"]
    assert cmd.startswith(f"slimlm bench tiny={path.parent.parent}") or cmd.startswith("slimlm bench tiny=")
    assert "--machine-name second" in cmd and "--seq-len 32" in cmd and "--repeats 2" in cmd


@pytest.mark.slow
def test_perplexity_identical_and_matches_transformers(two_runs, tiny: Path, corpus: Path) -> None:
    _, obj = two_runs
    a, b = obj["runs"]
    for label in ("tiny", "bf16"):
        pa, pb = _variant(a, label)["perplexity"]["story.txt"], _variant(b, label)["perplexity"]["story.txt"]
        for k in ("perplexity", "nll", "tokens_scored", "windows", "seq_len"):  # all but the seconds taken
            assert pa[k] == pb[k], (label, k)
    got = _variant(a, "tiny")["perplexity"]["story.txt"]
    # oracle: transformers on the same tokens, non-overlapping windows of SEQ within the first MAXTOK
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny).eval()
    ppl, n = _hf_perplexity(hf, tiny, corpus)
    assert got["windows"] == n and got["tokens_scored"] == n * (SEQ - 1)
    assert abs(got["perplexity"] - ppl) < 1e-4 * got["perplexity"]


def _hf_perplexity(hf: Any, tiny: Path, corpus: Path) -> tuple[float, int]:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tiny)(corpus.read_text(), add_special_tokens=False)["input_ids"][:MAXTOK]
    n = len(ids) // SEQ
    with torch.no_grad():
        nll = sum(float(hf(w, labels=w).loss) * (SEQ - 1) for w in torch.tensor(ids[: n * SEQ]).view(n, 1, SEQ))
    return math.exp(nll / (n * (SEQ - 1))), n


@pytest.mark.slow
def test_adapter_variant_matches_peft(two_runs, tiny: Path, corpus: Path, adapter: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    hide_old_gptqmodel(monkeypatch.setattr)  # an old gptqmodel next to peft makes peft refuse any layer

    _, obj = two_runs
    got = _variant(obj["runs"][0], "lora")
    assert got["status"] == "ok" and got["adapter"] == str(adapter)
    hf = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), str(adapter)).eval()
    ppl, _ = _hf_perplexity(hf, tiny, corpus)
    assert abs(got["perplexity"]["story.txt"]["perplexity"] - ppl) < 1e-4 * ppl
    assert abs(ppl / _variant(obj["runs"][0], "tiny")["perplexity"]["story.txt"]["perplexity"] - 1) > 1e-3


@pytest.mark.slow
def test_failing_variant_recorded_and_the_rest_measured(two_runs, corpus: Path) -> None:
    _, obj = two_runs
    for run in obj["runs"]:
        broken = _variant(run, "broken")
        assert broken["status"] == "failed"
        assert broken["error"].startswith("load: CheckpointError: ") and str(corpus) in broken["error"]
        assert "\n" not in broken["error"] and "memory" not in broken
        for label in ("tiny", "bf16"):
            v = _variant(run, label)
            assert v["status"] == "ok" and v["error"] is None
            for key in ("prefill_tok_s", "ttft_s", "decode_tok_s", "decode_tok_s_concurrent"):
                s = v["speed"][key]
                assert s["n"] == REPEATS and len(s["runs"]) == REPEATS and s["min"] <= s["median"] <= s["max"] > 0


@pytest.mark.slow
def test_memory_and_size_facts(two_runs, tiny: Path) -> None:
    _, obj = two_runs
    cfg = json.loads((tiny / "config.json").read_text())
    from transformers import AutoModelForCausalLM

    params = AutoModelForCausalLM.from_pretrained(tiny).num_parameters()
    head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token_fp32 = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4  # k and v, fp32
    run = obj["runs"][0]
    for label, elem in (("tiny", 4), ("bf16", 2)):
        v = _variant(run, label)
        m = v["memory"]
        assert v["parameters"] == params
        assert v["size_on_disk_bytes"] == (tiny / "model.safetensors").stat().st_size
        assert v["weight_bytes"] == params * elem and v["bits_per_weight"] == 8 * elem
        assert m["kv_cache_bytes_per_token"] == per_token_fp32 * elem // 4
        assert m["kv_cache_bytes"] == {"batch_1": m["kv_cache_bytes_per_token"] * 12,
                                       "batch_2": m["kv_cache_bytes_per_token"] * 24}  # (8 + 4) tokens a stream
        assert m["rss_after_load_bytes"] > m["rss_before_load_bytes"] > 0
        assert m["peak_rss_bytes"] >= m["rss_after_load_bytes"]


def test_interleave_runs_rounds_in_turn() -> None:
    calls: list[str] = []

    def measure(name: str, value: float) -> Any:
        def fn() -> dict[str, float]:
            calls.append(name)
            return {"x": value + len(calls)}
        return fn

    out = interleave({"A": measure("A", 0), "B": measure("B", 100)}, rounds=3, warmup=1)
    assert calls == ["A", "B"] * 4  # one warm-up round, then A, B, A, B, A, B
    assert out == {"A": {"x": [3, 5, 7]}, "B": {"x": [104, 106, 108]}}  # warm-up samples dropped


def test_summarize() -> None:
    s = summarize([4.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 4.0, 3) and s["spread"] == 1.5


def test_variant_specs() -> None:
    v = Variant.parse("/m/gptq-w4,dtype=bf16,adapter=/a/lora1")
    assert (v.label, v.model, v.dtype, v.adapter) == ("gptq-w4-bf16+lora1", "/m/gptq-w4", "bf16", "/a/lora1")
    v = Variant.parse("base=smollm2-135m,dequantize=yes")
    assert (v.label, v.model, v.dequantize) == ("base", "smollm2-135m", True)
    for bad in ("x,dtype=fp16", "x,colour=red", "=x", "x,dequantize=maybe"):
        with pytest.raises(SlimlmError, match="variant"):
            Variant.parse(bad)


@pytest.mark.parametrize("content, message", [
    ("[1, 2", "corrupt results file"),
    (json.dumps({"schema": "slimlm-bench-results", "schema_version": 99, "runs": []}), "schema_version 99"),
    ("just text", "corrupt results file"),
])
def test_bad_results_file_is_refused_and_kept(tiny: Path, tmp_path: Path, capsys, content: str, message: str) -> None:
    out = tmp_path / "results.json"
    out.write_text(content)
    assert main(["bench", str(tiny), "--out", str(out), *SMALL]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {out}: ") and message in err[0], err
    assert out.read_text() == content  # nothing lost


@pytest.mark.parametrize("extra, message", [
    (["--data", "no/such/corpus.txt"], "corpus file not found: no/such/corpus.txt"),
    (["--base", "nope"], "--base 'nope' is none of the variants"),
    (["{tiny}"], "two variants are labelled 'tiny0'"),  # the folder name is the default label
])
def test_bad_input_exits_2_before_any_work(tiny: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    out = tmp_path / "results.json"
    argv = ["bench", str(tiny), *[e.format(tiny=tiny) for e in extra], "--out", str(out), *SMALL]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {message}"), err
    assert not out.exists()
