"""The OpenAI-compatible server against the official ``openai`` client, on a tiny model over loopback.

Oracles: slimlm's single-stream ``generate`` (contiguous cache) for greedy text, the offline engine
with the same per-choice seeds for ``n=2`` sampling, transformers' log-softmax for ``logprobs``;
OpenAI's error body shape for bad input."""

from __future__ import annotations

import json
import time

import httpx2 as httpx  # the HTTP client the pinned openai package uses
import pytest
import torch

from slimlm.engine.generate import generate
from slimlm.engine.llm import LLM, LLMEngine
from slimlm.engine.sampling import SamplingConfig
from slimlm.engine.scheduler import SchedulerConfig
from slimlm.loaders import load_model
from slimlm.server.async_engine import AsyncEngine
from tests.helpers.models import make_hf_model
from tests.helpers.server import metric, serving
from tests.helpers.tokenizers import make_tiny_tokenizer

CFG = SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=32)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tok = make_tiny_tokenizer()
    hf = make_hf_model("llama", folder, vocab_size=tok.vocab_size)
    tok.save(folder)
    lm = load_model(str(folder))
    aeng = AsyncEngine(LLMEngine(lm.model, lm.tokenizer, CFG))
    with serving(aeng, lm.tokenizer) as (client, base):
        yield lm, client, base, aeng, hf


def _greedy_text(lm, ids, n):
    res = generate(lm.model, lm.tokenizer, [ids], SamplingConfig(max_new_tokens=n, ignore_eos=True))
    return res.texts[0]


def test_completions_chat_and_models(server):
    lm, client, base, _, _ = server
    prompt = "def add(a, b):"
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    ids = lm.tokenizer.encode(prompt)
    assert r.choices[0].text == _greedy_text(lm, ids, 12) and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 12)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    c = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    chat_ids = lm.tokenizer.encode(lm.tokenizer.apply_chat_template(msgs, add_generation_prompt=True))
    assert c.choices[0].message.content == _greedy_text(lm, chat_ids, 10)
    assert c.choices[0].message.role == "assistant" and c.usage.prompt_tokens == len(chat_ids)
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_equals_the_full_answer_and_reports_usage(server):
    lm, client, _, _, _ = server
    kw = dict(model="tiny", max_tokens=14, temperature=0, extra_body={"ignore_eos": True})
    full = client.completions.create(prompt="class A:", **kw).choices[0].text
    chunks = list(client.completions.create(prompt="class A:", stream=True,
                                            stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 14
    msgs = [{"role": "user", "content": "Hi"}]
    full = client.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    chunks = list(client.chat.completions.create(messages=msgs, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == full
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n2_sampling_matches_the_offline_engine_with_the_same_seeds(server):
    lm, client, _, _, _ = server
    r = client.completions.create(model="tiny", prompt="import os", max_tokens=8, temperature=0.8, top_p=0.9, n=2,
                                  seed=5, extra_body={"ignore_eos": True, "top_k": 40})
    ids = lm.tokenizer.encode("import os")
    llm = LLM(lm, CFG)
    want = [llm.generate([ids], SamplingConfig(max_new_tokens=8, temperature=0.8, top_p=0.9, top_k=40, seed=5 + i,
                                               ignore_eos=True))[0].text for i in range(2)]
    assert sorted((c.index, c.text) for c in r.choices) == list(enumerate(want))
    assert r.usage.completion_tokens == 16


def test_stop_strings_cut_the_text_in_full_and_streamed_answers(server):
    lm, client, _, _, _ = server
    kw = dict(model="tiny", prompt="for i in", max_tokens=20, temperature=0, extra_body={"ignore_eos": True})
    base_text = client.completions.create(**kw).choices[0].text
    stop = base_text[6:9]
    r = client.completions.create(stop=[stop], **kw).choices[0]
    assert r.finish_reason == "stop" and r.text == base_text[:base_text.find(stop)]
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=[stop], stream=True, **kw))
    assert streamed == r.text


@pytest.mark.parametrize("body,status,param", [
    ('{"model": "tiny", "prompt": ', 400, None),  # malformed JSON
    ('{"model": "tiny", "prompt": "x", "max_tokens": "5"}', 400, "max_tokens"),  # wrong type
    ('{"model": "tiny", "prompt": "x", "max_tokens": 0}', 400, "max_tokens"),
    ('{"model": "tiny", "prompt": "x", "max_tokens": 500}', 400, "max_tokens"),  # beyond the context
    ('{"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, "temperature": -1}', 400, None),
    ('{"model": "other", "prompt": "x"}', 404, "model"),
    ('{"model": "tiny", "prompt": [1, 999999]}', 400, None),  # token id outside the vocabulary
    ('{"model": "tiny", "prompt": "x", "logprobs": 50}', 400, "logprobs"),
    ('{"model": "tiny", "prompt": "x", "kv_policy": "int8"}', 400, "kv_policy"),  # not this server's policy
    ('{"model": "tiny", "prompt": "x", "kv_policy": "int9"}', 400, "kv_policy"),
])
def test_bad_input_gets_an_openai_error_and_the_server_stays_up(server, body, status, param):
    _, _, base, _, _ = server
    r = httpx.post(base + "/v1/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if param:
        assert err["param"] == param
    assert httpx.get(base + "/health").status_code == 200


def test_long_prompt_and_bad_chat_requests(server):
    lm, _, base, _, _ = server
    r = httpx.post(base + "/v1/completions", json={"model": "tiny", "prompt": list(range(3, 140))})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = httpx.post(base + "/v1/chat/completions", json={"model": "tiny", "messages": []})
    assert r.status_code == 400
    r = httpx.post(base + "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": "x"}],
                                                        "response_format": {"type": "json_schema", "json_schema": {
                                                            "name": "x", "schema": {"type": "object", "properties": {
                                                                "a": {"type": "datetime"}}}}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
    assert "datetime" in r.json()["error"]["message"]
    assert httpx.get(base + "/health").status_code == 200


def test_cancelled_stream_frees_its_blocks(server):
    _, _, base, aeng, _ = server
    body = {"model": "tiny", "prompt": "while True:", "max_tokens": 100, "temperature": 0, "stream": True,
            "ignore_eos": True}
    aborted = metric(base, "requests_aborted_total")
    with httpx.stream("POST", base + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [json.loads(line[6:]) for line, _ in zip((x for x in lines if x.startswith("data: {")), range(3),
                                                        strict=False)]
        assert len(got) == 3
        assert metric(base, "kv_blocks_used") > 0
    for _ in range(200):  # the server notices the closed connection on its next write
        if metric(base, "kv_blocks_used") == 0 and not aeng.engine.has_unfinished():
            break
        time.sleep(0.05)
    assert metric(base, "kv_blocks_used") == 0
    assert metric(base, "requests_aborted_total") == aborted + 1
    assert metric(base, "generation_tokens_total") > 0


def test_logprobs_equal_transformers_log_softmax(server):
    lm, client, _, _, hf = server
    prompt = [5, 60, 70, 80, 90]
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    gen = generate(lm.model, lm.tokenizer, [prompt], SamplingConfig(max_new_tokens=6, ignore_eos=True)).tokens[0]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + gen])).logits[0, len(prompt) - 1:-1].log_softmax(-1)  # [6, V]
    assert len(lp.token_logprobs) == 6
    for t, s in zip(gen, lp.tokens, strict=True):  # text, or the vocabulary entry of a partial character
        assert s in (lm.tokenizer.decode([t], skip_special_tokens=False), lm.tokenizer.id_to_token(t))
    want = ref.gather(1, torch.tensor(gen).unsqueeze(1))[:, 0]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs), want, atol=1e-4, rtol=0)
    for j, top in enumerate(lp.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(lp.token_logprobs[j], abs=1e-6)
        torch.testing.assert_close(torch.tensor(sorted(top.values(), reverse=True)), ref[j].topk(3).values,
                                   atol=1e-4, rtol=0)
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
                                       temperature=0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = c.choices[0].logprobs.content
    assert len(content) == c.usage.completion_tokens == 5
    assert all(len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob for e in content)


def test_concurrent_load_no_lost_or_mixed_up_responses(server):
    """128 requests, 32 at a time, some streamed and some cancelled mid-stream: every completed answer
    is its own prompt's (the offline engine's tokens), and the block pool ends empty."""
    import asyncio
    import random

    lm, _, base, aeng, _ = server
    rng = random.Random(7)
    reqs = [([rng.randrange(3, 384) for _ in range(rng.randint(1, 40))], rng.randint(1, 12)) for _ in range(128)]
    llm = LLM(lm, CFG)
    want = [o.text for o in llm.generate([p for p, _ in reqs],
                                         [SamplingConfig(max_new_tokens=n, ignore_eos=True) for _, n in reqs])]
    aborted0 = metric(base, "requests_aborted_total")

    async def one(client, i, sem):
        prompt, n = reqs[i]
        body = {"model": "tiny", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        async with sem:
            if i % 3 == 0:  # streamed; every 9th closed after its first chunk
                body["stream"] = True
                text = ""
                async with client.stream("POST", base + "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            text += json.loads(line[6:])["choices"][0]["text"]
                            if i % 9 == 0 and n > 2:
                                return None
                return text
            r = await client.post(base + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

    async def main():
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i, sem) for i in range(len(reqs))))

    got = asyncio.run(main())
    cancelled = [i for i, g in enumerate(got) if g is None]
    assert cancelled and all(g == want[i] for i, g in enumerate(got) if g is not None)
    for _ in range(200):
        if not aeng.engine.has_unfinished():
            break
        time.sleep(0.05)
    assert metric(base, "kv_blocks_used") == 0
    assert metric(base, "requests_aborted_total") - aborted0 <= len(cancelled)
