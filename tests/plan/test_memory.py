"""Planner memory terms against what slimlm really allocates, on tiny models (exact or near-exact).

Weights: ``weight_bytes`` from the config alone vs ``module_nbytes`` of the model loaded and really
quantized (RTN int8/int4/int3, NF4). KV cache: vs the runtime's contiguous and paged caches. The
real SmolLM2 checks (peak RSS at context 2048, GPTQ calibration) are in test_real.py.
Run: ``.venv/bin/python -m pytest tests/plan/test_memory.py``.
"""

from __future__ import annotations

import json

import pytest
import torch

from slimlm.plan import memory as mem
from slimlm.plan.formats import parse_format, weight_bytes
from slimlm.plan.shapes import read_shape
from slimlm.utils.errors import SlimlmError
from tests.helpers.models import make_hf_model

DIMS = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=384, max_position_embeddings=256)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("plan") / "hf"
    make_hf_model("llama", d, **DIMS)
    return d


def _quantized(folder, fmt):
    from slimlm.loaders import load_model
    from slimlm.quant.api import quantize_
    from slimlm.quant.methods.nf4 import NF4Config
    from slimlm.quant.methods.rtn import RTNConfig
    from slimlm.utils.memory import module_nbytes, release_free_memory

    lm = load_model(str(folder), dtype=torch.bfloat16 if fmt == "bf16" else torch.float32)
    cfgs = {"int8": RTNConfig(bits=8, group_size=-1, symmetric=True), "int4": RTNConfig(bits=4, group_size=128),
            "int3": RTNConfig(bits=3, group_size=128), "int4-g32": RTNConfig(bits=4, group_size=32),
            "int6": RTNConfig(bits=6, group_size=128), "nf4": NF4Config()}
    if fmt in cfgs:
        quantize_(lm.model, cfgs[fmt])
    with torch.inference_mode():  # one decode call: a fused q|k|v copy of the float weights is dropped there
        lm.model(torch.zeros(1, 1, dtype=torch.long))
    release_free_memory()
    return module_nbytes(lm.model)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8", "int4", "int4-g32", "int3", "int6", "nf4"])
def test_weight_bytes_match_the_loaded_model(tiny, fmt):
    predicted = weight_bytes(read_shape(str(tiny)), parse_format(fmt), "fp32")["total"]
    # codes exact; the per-group scale copies differ by a few bytes on tiny rows (1.3% here for int4)
    assert predicted == pytest.approx(_quantized(tiny, fmt), rel=0.02)


def test_shape_is_read_without_weights(tiny, tmp_path):
    # a folder with config.json only (no weight file) plans the same shapes
    (tmp_path / "config.json").write_text((tiny / "config.json").read_text())
    a, b = read_shape(str(tiny)), read_shape(str(tmp_path))
    assert a.n_params == b.n_params
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(tiny)
    assert a.n_params == sum(p.numel() for p in ref.parameters())


def test_kv_cache_matches_the_runtime_caches(tiny):
    from slimlm.engine.paged_cache import PagedKVCache
    from slimlm.models.kv_cache import KVCache

    shape = read_shape(str(tiny))
    c = shape.config
    kv = KVCache.for_model(c, 3, 100, torch.bfloat16)
    assert mem.kv_cache_bytes(shape, 100, 3, "bf16") == kv.k.nbytes + kv.v.nbytes
    paged = PagedKVCache.for_model(c, num_blocks=3 * 7, block_size=16, dtype=torch.float32)  # ceil(100/16) = 7
    assert mem.kv_cache_bytes(shape, 100, 3, "fp32", block_size=16) == paged.nbytes


def test_serve_plan_steps_like_the_engine():
    """The serve plan's activation term is for the engine's step budget, not a planner-local guess."""
    from slimlm.engine.scheduler import SchedulerConfig
    from slimlm.plan.planner import PlanConfig

    assert PlanConfig().batched_tokens == SchedulerConfig().max_num_batched_tokens
    assert PlanConfig().kv_budget_gib == SchedulerConfig().kv_budget_gib


def test_serve_pool_is_what_the_engine_allocates(tiny):
    """The serve plan counts the engine's whole KV pool (allocated and zero-filled at start), and the
    streams it holds; oracle: the bytes of the ``PagedKVCache`` that ``LLM`` really builds."""
    from slimlm.engine.llm import LLM
    from slimlm.engine.scheduler import SchedulerConfig
    from slimlm.loaders import load_model
    from slimlm.plan.planner import PlanConfig, plan

    folder = tiny
    budget = 0.01  # GiB
    llm = LLM(load_model(str(folder), dtype=torch.float32), SchedulerConfig(kv_budget_gib=budget))
    engine_pool = llm.engine.runner.cache.nbytes
    cfg = PlanConfig(task="serve", formats=["fp32"], context=40, batch=3, kv_budget_gib=budget)
    v = plan(read_shape(str(folder)), cfg, None)["variants"][0]
    assert v["memory"]["kv pool (budget)"] == engine_pool
    per_seq = 3 * llm.engine.runner.cache.bytes_per_block()  # 40 tokens: 3 blocks of 16
    assert v["kv_needed_bytes"] == 3 * per_seq
    assert v["streams_in_pool"] == engine_pool // per_seq


def test_optimizer_states_by_optimizer():
    mats = [(64, 32), (1, 10)]
    n = 64 * 32 + 10
    assert mem.optimizer_state_bytes(mats, "adamw") == 8 * n
    assert mem.optimizer_state_bytes(mats, "lion") == 4 * n
    assert mem.optimizer_state_bytes(mats, "lomo") == 0
    assert mem.optimizer_state_bytes(mats, "adafactor") == 4 * (64 + 32) + 4 * 10
    assert mem.optimizer_state_bytes(mats, "came") == 4 * n + 8 * (64 + 32) + 8 * 10
    assert mem.optimizer_state_bytes(mats, "adamw8bit") == 2 * n + 8 * 1 + 8 * 1
    assert mem.optimizer_state_bytes([(512, 1024)], "galore", 128) == 4 * 512 * 128 + 8 * 128 * 1024
    assert mem.gradient_bytes(mats, "lomo") == 64 * 32 * 4 and mem.gradient_bytes(mats, "adamw") == 4 * n
    # adamw's states: the same count torch.optim.AdamW really allocates (exp_avg + exp_avg_sq, fp32)
    p = torch.nn.Parameter(torch.randn(64, 32))
    opt = torch.optim.AdamW([p])
    p.grad = torch.randn_like(p)
    opt.step()
    st = opt.state[p]
    assert mem.optimizer_state_bytes([(64, 32)], "adamw") == st["exp_avg"].nbytes + st["exp_avg_sq"].nbytes
    with pytest.raises(SlimlmError, match="unknown optimizer"):
        mem.optimizer_state_bytes(mats, "sgdx")


def test_lora_trainable_counts_match_rank(tiny):
    shape = read_shape(str(tiny))
    mats = mem.trainable_matrices(shape, "lora", 8)
    expect = sum(8 * (lin.in_features + lin.out_features) for lin in shape.decoder_linears())
    assert sum(r * c for r, c in mats) == expect
    assert sum(r * c for r, c in mem.trainable_matrices(shape, "full", 8)) == shape.n_params


def test_plan_cli_json_and_table(tiny, capsys):
    from slimlm.cli.main import main

    assert main(["plan", str(tiny), "--no-measure", "--json", "--context", "64", "--memory-gib", "1"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [v["format"] for v in r["variants"]] == ["fp32", "bf16", "int8", "int4"]
    v = r["variants"][0]
    assert v["memory"]["kv cache"] == mem.kv_cache_bytes(read_shape(str(tiny)), 64, 1, "fp32")
    # the largest context stops at the model's positions, the largest batch at the memory given
    assert v["max_context"] == 256 and v["max_batch"] > 1
    assert main(["plan", str(tiny), "--no-measure", "--task", "finetune", "--optimizer", "galore"]) == 0
    out = capsys.readouterr().out
    assert "optimizer (galore)" in out and "gradients" in out
    assert main(["plan", str(tiny), "--no-measure", "--task", "pretrain", "--flops", "1e18"]) == 0
    assert "optimal N" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "msg"), [
    (["--formats", "int9"], "unknown weight format 'int9'"),
    (["--formats", "int4-g20"], "group size must be a multiple of 32"),
    (["--context", "4096"], "exceeds the model's 256 positions"),
    (["--cpu-hours", "1", "--no-measure", "--context", "128"], "--cpu-hours needs"),
])
def test_bad_input_is_one_line(tiny, argv, msg, capsys, monkeypatch, tmp_path):
    from slimlm.cli.main import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached roofline
    assert main(["plan", str(tiny), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and msg in err, err


def test_load_transient_counts_the_fused_copies_and_the_dtype_copy(tiny):
    # oracle: transformers' own parameters of the same folder (q/k/v and gate/up are what the runtime fuses)
    from transformers import AutoModelForCausalLM

    from slimlm.plan.planner import PlanConfig, plan

    hf = AutoModelForCausalLM.from_pretrained(tiny)
    params = dict(hf.named_parameters())
    fused = sum(p.numel() for n, p in params.items() if n.split(".")[-2] in ("q_proj", "k_proj", "v_proj",
                                                                              "gate_proj", "up_proj"))
    total = sum(p.numel() for p in hf.parameters())  # tied head counted once, as the runtime does
    shape = read_shape(str(tiny))
    assert shape.checkpoint_dtype == "fp32"  # make_hf_model saves float32
    assert mem.load_transient_bytes(shape, "fp32", "fp32") == fused * 4
    assert mem.load_transient_bytes(shape, "bf16", "fp32") == fused * 2 + total * 4
    # the plan's peak: residue + weights + max(load transient, the run's KV cache + activations)
    for ctx in (8, 256):
        v = plan(shape, PlanConfig(formats=["fp32"], context=ctx), {"residue_bytes": 1000})["variants"][0]
        m = v["memory"]
        run = m["kv cache"] + m["activations (prefill)"]
        assert v["total_bytes"] == 1000 + m["weights"] + max(run, fused * 4)
    v = plan(shape, PlanConfig(formats=["int4"], context=8), {"residue_bytes": 1000})["variants"][0]
    assert "load transient beyond the run" not in v["memory"]  # a quantized checkpoint loads no float copies


@pytest.mark.parametrize("method", ["lora", "full"])
def test_training_saved_bytes_match_what_autograd_saves(tiny, method):
    """The planner's saved-activation term against the tensors autograd really keeps for backward in
    one packed training forward + chunked loss (``saved_tensors_hooks``; parameters excluded, each
    storage counted once)."""
    from slimlm.loaders import load_model
    from slimlm.peft import LoraConfig, apply_peft
    from slimlm.train.config import ALL_LINEAR

    model = load_model(str(tiny), dtype=torch.float32).model
    if method == "lora":
        model.requires_grad_(False)
        apply_peft(model, LoraConfig(r=4, target_modules=list(ALL_LINEAR)))
    else:
        model.requires_grad_(True)
    model.train()
    b, t = 2, 96
    ids = torch.randint(0, model.config.vocab_size, (b, t))
    seg = (torch.arange(t) >= t // 3).long().expand(b, t)  # two packed sequences per row
    pos = torch.cat([torch.arange(t // 3), torch.arange(t - t // 3)]).expand(b, t)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(x):  # type: ignore[no-untyped-def]
        st = x.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        model(ids, positions=pos, segment_ids=seg, labels=ids)
    measured = sum(seen.values())
    predicted = mem.training_saved_bytes(read_shape(str(tiny)), t, b, "fp32", False, 4 if method == "lora" else 0)
    assert abs(predicted / measured - 1) < 0.15, (predicted, measured)
