"""The serving engine's int8 KV pool: paged int8 attention vs transformers' fp logits (stated
tolerance), bytes held counted against the format ((D + 2) bytes per token and head for k and v),
the block budget counted in those bytes, and a request naming the server's policy is served."""

from __future__ import annotations

import torch

from slimlm.engine.llm import LLMEngine
from slimlm.engine.paged_cache import Int8PagedKVCache
from slimlm.engine.runner import BatchEntry, ModelRunner
from slimlm.engine.sampling import SamplingConfig
from slimlm.engine.scheduler import SchedulerConfig
from slimlm.loaders import load_model
from slimlm.models.kv_policy import KVPolicy
from tests.helpers.models import make_hf_model


def test_int8_paged_logits_close_to_transformers_and_bytes(tmp_path):
    hf = make_hf_model("llama", tmp_path)
    model = load_model(str(tmp_path)).model
    ids = torch.randint(0, 256, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    runner = ModelRunner(model, num_blocks=16, block_size=4, kv_policy=KVPolicy(method="int8"))
    assert isinstance(runner.cache, Int8PagedKVCache)
    table = [7, 3, 12, 0, 9, 1, 4, 15]  # scattered blocks
    got = [runner.forward([BatchEntry(table, 0, ids[:10], num_logits=10)])]  # fresh prompt: exact k/v
    got.append(runner.forward([BatchEntry(table, 10, ids[10:18], num_logits=8)]))  # chunk reads int8 history
    for i in range(18, 30):  # decodes read int8 history
        got.append(runner.forward([BatchEntry(table, i, ids[i:i + 1])]))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    out = torch.cat(got)
    assert (out - ref).abs().max() <= 2e-2 * ref.abs().max()
    c = model.config
    assert runner.cache.nbytes == 16 * 4 * c.num_hidden_layers * c.num_key_value_heads * (c.head_dim + 2) * 2


def test_engine_budget_in_int8_bytes_and_matching_request(tmp_path):
    make_hf_model("llama", tmp_path)
    model = load_model(str(tmp_path)).model
    c = model.config
    budget = 2**20 / 2**30  # 1 MiB
    cfg = SchedulerConfig(kv_budget_gib=budget, block_size=4)
    full = LLMEngine(model, None, cfg)
    int8 = LLMEngine(model, None, cfg, kv_policy=KVPolicy.parse("int8"))
    per_tok = 2 * c.num_hidden_layers * c.num_key_value_heads
    assert full.cfg.num_blocks == 2**20 // (4 * per_tok * c.head_dim * 4)  # fp32 k/v
    assert int8.cfg.num_blocks == 2**20 // (4 * per_tok * (c.head_dim + 2))
    assert int8.runner.cache.nbytes <= 2**20 < int8.runner.cache.nbytes + int8.runner.cache.bytes_per_block()
    outs = [o for o in _run(int8, [5, 6, 7, 8], 6)]
    assert outs and outs[-1].finished and len(outs[-1].token_ids) == 6


def _run(engine, prompt, n):  # type: ignore[no-untyped-def]
    engine.add_request(prompt, SamplingConfig(max_new_tokens=n, ignore_eos=True))
    while engine.has_unfinished():
        yield from engine.step()
