"""Multi-LoRA serving in the engine: a batch mixing the base model and two peft-written adapters gives
every request peft's own greedy tokens for its adapter (transformers + peft, the oracle), in shared
steps; prefix-cache blocks are never shared across adapters; adapters load and unload at run time.

Run: ``.venv/bin/python -m pytest tests/engine/test_multi_lora.py``
"""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from slimlm.engine.llm import LLM, LLMEngine
from slimlm.engine.sampling import SamplingConfig
from slimlm.engine.scheduler import SchedulerConfig
from slimlm.loaders import load_model
from slimlm.peft.serving import ServedLoraLinear
from slimlm.utils.errors import SlimlmError
from tests.helpers.lora import peft_greedy, write_peft_adapters
from tests.helpers.models import make_hf_model

pytest.importorskip("peft")
N = 8  # greedy tokens per request


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlora")
    make_hf_model("llama", root / "base")
    folders = write_peft_adapters(root / "base", root)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 256) for _ in range(rng.randint(2, 19))] for _ in range(6)]
    want = {name: peft_greedy(root / "base", folders.get(name), prompts, N) for name in (None, "sql", "chat")}
    assert want[None] != want["sql"] and want[None] != want["chat"] and want["sql"] != want["chat"]
    return root, folders, prompts, want


def _llm(root, folders, cfg=None):  # type: ignore[no-untyped-def]
    llm = LLM(load_model(str(root / "base")), cfg or SchedulerConfig(num_blocks=64, block_size=4,
                                                                     max_num_batched_tokens=64))
    for name, f in folders.items():
        llm.engine.add_adapter(name, f)
    return llm


def _engine(root, folders, cfg=None):  # type: ignore[no-untyped-def]
    return _llm(root, folders, cfg).engine


def _run(eng, reqs):  # type: ignore[no-untyped-def]
    """reqs: [(prompt, adapter)] -> tokens per request, and the adapter sets of every forward."""
    seen: list[set[str | None]] = []
    fwd = eng.runner.forward
    eng.runner.forward = lambda entries, copies=(): (seen.append({e.adapter for e in entries}), fwd(entries, copies))[1]
    rids = [eng.add_request(p, SamplingConfig(max_new_tokens=N, ignore_eos=True), adapter=a) for p, a in reqs]
    done = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.token_ids
    eng.runner.forward = fwd
    return [done[r] for r in rids], seen


def test_a_mixed_batch_gives_each_request_peft_tokens_of_its_adapter(tiny):
    root, folders, prompts, want = tiny
    llm = _llm(root, folders, SchedulerConfig(num_blocks=256, block_size=4, max_num_seqs=32))
    eng = llm.engine
    assert eng.adapters == ["sql", "chat"]
    names = [None, "sql", "chat"]
    reqs = [(p, names[(i + j) % 3]) for i, p in enumerate(prompts) for j in range(3)]  # 18: each prompt x each
    got, seen = _run(eng, reqs)
    for (p, a), toks in zip(reqs, got, strict=True):
        assert toks == want[a][prompts.index(p)], (a, p)
    assert {None, "sql", "chat"} in seen  # base + both adapters ran in one forward
    assert len(seen) == N  # all 18 requests in the same steps (one prefill, then decodes), not adapter by adapter
    pool = eng.scheduler.kv.pool
    assert pool.num_used == 0
    # the offline API takes one adapter per prompt
    outs = llm.generate(prompts[:3], SamplingConfig(max_new_tokens=N, ignore_eos=True), adapters=["chat", None, "sql"])
    assert [o.token_ids for o in outs] == [want["chat"][0], want[None][1], want["sql"][2]]


def test_prefix_cache_blocks_are_not_shared_across_adapters(tiny):
    root, folders, _, _ = tiny
    eng = _engine(root, folders)
    prompt = list(range(10, 31))  # 21 tokens: 5 full blocks of 4
    want = {a: peft_greedy(root / "base", folders.get(a), [prompt], N)[0] for a in (None, "sql")}
    cached = {}
    for i, a in enumerate([None, "sql", "sql", None, "chat"]):
        rid = eng.add_request(prompt, SamplingConfig(max_new_tokens=N, ignore_eos=True), adapter=a)
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    cached[i] = o.num_cached_prompt_tokens
                    if a in want:
                        assert o.token_ids == want[a], (i, a)
        assert rid == i
    assert cached == {0: 0, 1: 0, 2: 20, 3: 20, 4: 0}  # a hit only under the same adapter


def test_adapters_load_and_unload_at_run_time(tiny):
    root, folders, prompts, want = tiny
    eng = _engine(root, {})
    lin = eng.model.model.layers[0].self_attn.q_proj
    params = SamplingConfig(max_new_tokens=N, ignore_eos=True)
    base_id = eng.add_request(prompts[0], params)
    eng.step()  # the base request is running when the adapter arrives
    eng.add_adapter("sql", folders["sql"])
    assert isinstance(eng.model.model.layers[0].self_attn.q_proj, ServedLoraLinear)
    sql_id = eng.add_request(prompts[1], params, adapter="sql")
    with pytest.raises(SlimlmError, match="in use by 1"):
        eng.remove_adapter("sql")
    done = {}
    while eng.has_unfinished():
        done.update({o.request_id: o.token_ids for o in eng.step() if o.finished})
    assert done == {base_id: want[None][0], sql_id: want["sql"][1]}
    eng.remove_adapter("sql")
    assert eng.adapters == [] and eng.model.model.layers[0].self_attn.q_proj is lin  # the plain base is back
    assert not any(isinstance(m, ServedLoraLinear) for m in eng.model.modules())
    with pytest.raises(SlimlmError, match="unknown adapter 'sql'"):
        eng.add_request(prompts[1], params, adapter="sql")
    with pytest.raises(SlimlmError, match="no adapter named"):
        eng.remove_adapter("sql")
    # the name comes back holding another adapter: its requests never reuse the old adapter's blocks
    eng.add_adapter("sql", folders["chat"])
    rid = eng.add_request(prompts[1], params, adapter="sql")
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                assert o.request_id == rid and o.num_cached_prompt_tokens == 0 and o.token_ids == want["chat"][1]
    with pytest.raises(SlimlmError, match="already loaded"):
        eng.add_adapter("sql", folders["sql"])
    with pytest.raises(SlimlmError, match="not an adapter folder"):
        eng.add_adapter("x", root / "base")
    assert eng.adapters == ["sql"]
    assert isinstance(lin, nn.Linear) and torch.is_tensor(lin.weight)


def test_a_quantized_base_serves_adapters_as_slimlm_lora_does_on_it(tiny):
    """int8 (RTN) base linears: the served adapter equals slimlm's single-adapter LoRA on the same
    quantized model (``load_adapter``, checked against peft in tests/peft)."""
    from slimlm.engine.generate import generate
    from slimlm.peft import load_adapter
    from slimlm.quant import RTNConfig, quantize_

    root, folders, prompts, _ = tiny

    def quantized():  # type: ignore[no-untyped-def]
        lm = load_model(str(root / "base"))
        quantize_(lm.model, RTNConfig(bits=8, group_size=32, symmetric=True))
        return lm

    want = {}
    for a in (None, "sql"):
        lm = quantized()
        if a is not None:
            load_adapter(lm.model, folders[a])
        want[a] = [generate(lm.model, None, [p], SamplingConfig(max_new_tokens=N, ignore_eos=True)).tokens[0]
                   for p in prompts[:3]]
    assert want[None] != want["sql"]
    eng = LLMEngine(quantized().model, None, SchedulerConfig(num_blocks=64, block_size=4))
    eng.add_adapter("sql", folders["sql"])
    reqs = [(p, a) for p in prompts[:3] for a in (None, "sql")]
    got, seen = _run(eng, reqs)
    assert got == [want[a][prompts.index(p)] for p, a in reqs]
    assert {None, "sql"} in seen
