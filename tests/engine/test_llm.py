"""The engine end to end on tiny models: continuous batching gives every request the tokens it gets
alone (slimlm's contiguous-cache generator and transformers' logits as oracles), through chunked
prefill, preemption and prefix-cache hits; per-request seeds; stop strings; abort; bad input."""

from __future__ import annotations

import random

import pytest
import torch

from slimlm.engine.generate import generate
from slimlm.engine.llm import LLM
from slimlm.engine.sampling import SamplingConfig
from slimlm.engine.scheduler import SchedulerConfig
from slimlm.loaders import load_model
from slimlm.utils.errors import SlimlmError
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    hf = make_hf_model("llama", folder)
    return hf, load_model(str(folder))


def _alone(lm, prompt, params):
    return generate(lm.model, lm.tokenizer, [prompt], params).tokens[0]


def _hf_greedy(hf, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(hf(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("cfg", [
    SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=16),  # chunked prefill
    SchedulerConfig(num_blocks=10, block_size=4, max_num_batched_tokens=64, prefix_caching=False),  # preemption
    SchedulerConfig(num_blocks=256, block_size=16, max_num_seqs=2),  # waiting queue
])
def test_batch_of_different_length_requests_equals_each_alone(tiny, cfg):
    hf, lm = tiny
    rng = random.Random(0)
    lens, news = [3, 9, 17, 30, 5], [12, 5, 9, 1, 16]
    prompts = [[rng.randrange(256) for _ in range(n)] for n in lens]
    params = [SamplingConfig(max_new_tokens=n, ignore_eos=True) for n in news]
    llm = LLM(lm, cfg)
    outs = llm.generate(prompts, params)
    for p, pr, o in zip(prompts, params, outs, strict=True):
        assert o.token_ids == _alone(lm, p, pr) and o.finish_reason == "length"
    assert outs[4].token_ids == _hf_greedy(hf, prompts[4], 16)
    if not cfg.prefix_caching:
        assert llm.engine.stats["preemptions"] > 0
    pool = llm.engine.scheduler.kv.pool
    assert pool.num_free == pool.num_blocks


def test_shared_prefix_is_served_from_the_cache(tiny):
    _, lm = tiny
    rng = random.Random(1)
    system = [rng.randrange(256) for _ in range(40)]
    prompts = [system + [rng.randrange(256) for _ in range(n)] for n in (3, 7, 1)]
    pr = SamplingConfig(max_new_tokens=6, ignore_eos=True)
    llm = LLM(lm, SchedulerConfig(num_blocks=64, block_size=8))
    first = llm.generate(prompts[:1], pr)[0]
    assert first.num_cached_prompt_tokens == 0
    rest = llm.generate(prompts[1:], pr)
    assert [o.num_cached_prompt_tokens for o in rest] == [40, 40]
    for p, o in zip(prompts[1:], rest, strict=True):
        assert o.token_ids == _alone(lm, p, pr)


def test_sampled_requests_follow_their_own_seed_whatever_the_batch(tiny):
    _, lm = tiny
    p = [5, 6, 7, 8]
    sampled = SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=50, seed=11, ignore_eos=True)
    other = SamplingConfig(max_new_tokens=7, temperature=1.3, seed=3, ignore_eos=True)
    llm = LLM(lm, SchedulerConfig(num_blocks=64, block_size=4))
    alone = llm.generate([p], sampled)[0].token_ids
    batched = llm.generate([[9] * 12, p, [1, 2]], [other, sampled, other])[1].token_ids
    assert alone == batched
    assert alone != llm.generate([p], SamplingConfig(max_new_tokens=10, temperature=0.9, top_k=50, seed=12,
                                                     ignore_eos=True))[0].token_ids


def test_stop_strings_and_text(tmp_path):
    tok = make_tiny_tokenizer()
    make_hf_model("llama", tmp_path, vocab_size=tok.vocab_size)
    tok.save(tmp_path)
    lm = load_model(str(tmp_path))
    llm = LLM(lm, SchedulerConfig(num_blocks=64, block_size=4))
    base = llm.generate(["def f(x):"], SamplingConfig(max_new_tokens=24, ignore_eos=True))[0]
    assert base.text == tok.decode(base.token_ids)
    stop = base.text[8:10]  # two characters somewhere in the output
    assert len(stop) == 2
    o = llm.generate(["def f(x):"], SamplingConfig(max_new_tokens=24, ignore_eos=True, stop=[stop]))[0]
    assert o.finish_reason == "stop" and o.text == base.text[:base.text.find(stop)]
    assert o.token_ids == base.token_ids[:len(o.token_ids)]


def test_abort_mid_generation_frees_blocks_and_bad_input_raises(tiny):
    _, lm = tiny
    llm = LLM(lm, SchedulerConfig(num_blocks=24, block_size=4))
    eng = llm.engine
    a = eng.add_request(list(range(20)), SamplingConfig(max_new_tokens=50, ignore_eos=True))
    b = eng.add_request(list(range(5)), SamplingConfig(max_new_tokens=3, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert eng.stats["kv_blocks_used"] > 0
    assert eng.abort(a)
    assert eng.scheduler.kv.pool.num_used == len(eng.scheduler.kv.tables.get(b, []))
    while eng.has_unfinished():
        eng.step()
    assert eng.stats["kv_blocks_used"] == 0
    with pytest.raises(SlimlmError, match="context"):
        llm.generate([list(range(128))])
    with pytest.raises(SlimlmError, match="token ids"):
        llm.generate([[999]])
    with pytest.raises(SlimlmError, match="KV blocks"):
        llm.generate([[1, 2]], SamplingConfig(max_new_tokens=126))
    with pytest.raises(SlimlmError, match="tokenizer"):
        llm.generate(["text"])
    assert not eng.has_unfinished()


def test_a_group_computes_its_prompt_once_and_each_member_equals_a_lone_request(tiny):
    _, lm = tiny
    prompt = list(range(40, 70))  # 30 tokens: the shared last block is copied on write
    seeds = [SamplingConfig(max_new_tokens=9, temperature=1.1, seed=s, ignore_eos=True) for s in (1, 2, 3)]
    cfg = SchedulerConfig(num_blocks=64, block_size=8, prefix_caching=False)
    alone = [LLM(lm, cfg).generate([prompt], p)[0].token_ids for p in seeds]
    eng = LLM(lm, cfg).engine
    ran = []
    forward = eng.runner.forward
    eng.runner.forward = lambda entries, copies=(): (ran.append(sum(len(e.tokens) for e in entries)),
                                                     forward(entries, copies))[1]
    ids = eng.add_group(prompt, seeds)
    other = eng.add_request([1, 2, 3], SamplingConfig(max_new_tokens=4, ignore_eos=True))
    got: dict[int, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o.token_ids
    assert [got[i] for i in ids] == alone
    assert sum(ran) == 30 + 3 + 3 * 8 + 3  # prompt once, the other prompt, 8 decodes per member, 3 for the other
    assert other in got and eng.stats["kv_blocks_used"] == 0
    # a member aborted before the prompt is done never starts; aborting the head hands its role on
    ids = eng.add_group(prompt, seeds)
    assert eng.abort(ids[1]) and eng.abort(ids[0])
    got = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                got[o.request_id] = o.token_ids
    assert list(got) == [ids[2]] and got[ids[2]] == alone[2]
    assert eng.stats["kv_blocks_used"] == 0
