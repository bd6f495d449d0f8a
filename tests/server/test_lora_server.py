"""Multi-LoRA through ``slimlm serve``'s app with the official ``openai`` client: the ``model`` field
picks the base or an adapter (each answer is peft's own greedy output for that adapter, transformers +
peft the oracle), adapters load and unload over HTTP, unknown names get OpenAI-style 404s, and a
mixed load (150 requests, 32 at a time, some streamed, some cancelled mid-stream) loses or mixes up
no answer and leaves the block pool empty.

Run: ``.venv/bin/python -m pytest tests/server/test_lora_server.py``
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import httpx2 as httpx
import openai
import pytest

from slimlm.engine.llm import LLM, LLMEngine
from slimlm.engine.sampling import SamplingConfig
from slimlm.engine.scheduler import SchedulerConfig
from slimlm.loaders import load_model
from slimlm.server.async_engine import AsyncEngine
from tests.helpers.lora import peft_greedy, write_peft_adapters
from tests.helpers.models import make_hf_model
from tests.helpers.server import metric, serving
from tests.helpers.tokenizers import make_tiny_tokenizer

pytest.importorskip("peft")
CFG = SchedulerConfig(num_blocks=160, block_size=16, max_num_seqs=32, max_num_batched_tokens=256)
PROMPTS = [[5, 60, 70, 80, 90], [200, 17, 33], [9, 9, 41, 250, 7, 120, 64]]
N = 6


@pytest.fixture(scope="module")
def lora_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_srv")
    tok = make_tiny_tokenizer()
    make_hf_model("llama", root / "base", vocab_size=tok.vocab_size, max_position_embeddings=2048)
    tok.save(root / "base")
    folders = write_peft_adapters(root / "base", root)
    want = {a: peft_greedy(root / "base", folders.get(a), PROMPTS, N) for a in (None, "sql", "chat")}
    lm = load_model(str(root / "base"))
    eng = LLMEngine(lm.model, lm.tokenizer, CFG)
    for name, f in folders.items():
        eng.add_adapter(name, f)
    aeng = AsyncEngine(eng)
    with serving(aeng, lm.tokenizer, adapter_loading=True) as (client, base):
        yield root, folders, lm, client, base, aeng, want


def _idle(base, aeng):  # type: ignore[no-untyped-def]
    for _ in range(400):  # the server notices a closed connection on its next write
        if metric(base, "kv_blocks_used") == 0 and not aeng.engine.has_unfinished():
            return True
        time.sleep(0.05)
    return False


def test_the_model_field_selects_an_adapter(lora_server):
    _, _, lm, client, base, _, want = lora_server
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny", "sql", "chat"]
    assert [getattr(m, "parent", None) for m in models] == [None, "tiny", "tiny"]
    for name in ("tiny", "sql", "chat"):
        for i, p in enumerate(PROMPTS):
            r = client.completions.create(model=name, prompt=p, max_tokens=N, temperature=0,
                                          extra_body={"ignore_eos": True})
            assert r.model == name
            assert r.choices[0].text == lm.tokenizer.decode(want[None if name == "tiny" else name][i]), (name, i)
    chunks = list(client.completions.create(model="chat", prompt=PROMPTS[2], max_tokens=N, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == lm.tokenizer.decode(want["chat"][2])
    c = client.chat.completions.create(model="sql", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0)
    assert c.model == "sql" and c.choices[0].message.role == "assistant"
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt=PROMPTS[0], max_tokens=2)
    err = e.value.response.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model" and "'sql'" in err["message"]


def test_adapters_load_and_unload_over_http(lora_server):
    _, folders, lm, client, base, aeng, want = lora_server
    r = httpx.post(base + "/v1/load_lora_adapter", json={"lora_name": "sql2", "lora_path": str(folders["sql"])})
    assert r.status_code == 200 and "sql2" in r.text
    assert "sql2" in [m.id for m in client.models.list().data] and metric(base, "lora_adapters_loaded") == 3
    got = client.completions.create(model="sql2", prompt=PROMPTS[1], max_tokens=N, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == lm.tokenizer.decode(want["sql"][1])
    for body, status, param in [
        ({"lora_name": "sql2", "lora_path": str(folders["chat"])}, 400, "lora_name"),  # already served
        ({"lora_name": "tiny", "lora_path": str(folders["chat"])}, 400, "lora_name"),  # the base's name
        ({"lora_name": "x", "lora_path": str(folders["sql"].parent / "base")}, 400, "lora_path"),  # not an adapter
        ({"lora_name": "x"}, 400, "lora_path"),  # missing field
    ]:
        r = httpx.post(base + "/v1/load_lora_adapter", json=body)
        assert r.status_code == status and r.json()["error"]["param"] == param, (body, r.text)
    # an adapter in use is not unloaded under a running stream (2,000 tokens: seconds)
    body = {"model": "sql2", "prompt": PROMPTS[0], "max_tokens": 2000, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", base + "/v1/completions", json=body) as s:
        lines = s.iter_lines()  # kept: a dropped iterator closes the stream
        assert next(lines).startswith("data: {")
        r = httpx.post(base + "/v1/unload_lora_adapter", json={"lora_name": "sql2"})
        assert r.status_code == 409 and "in use" in r.json()["error"]["message"]
    assert _idle(base, aeng)  # the cancelled stream freed its blocks
    r = httpx.post(base + "/v1/unload_lora_adapter", json={"lora_name": "sql2"})
    assert r.status_code == 200
    assert [m.id for m in client.models.list().data] == ["tiny", "sql", "chat"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sql2", prompt=PROMPTS[0], max_tokens=2)
    r = httpx.post(base + "/v1/unload_lora_adapter", json={"lora_name": "sql2"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(base + "/health").status_code == 200


def test_mixed_adapter_load_loses_and_mixes_up_nothing(lora_server):
    """150 requests over base + 2 adapters, 32 at a time; every 3rd streamed, every 9th of those closed
    after its first chunk. Each completed answer is its own prompt's under its own adapter (the
    offline engine on a fresh copy of the model, whose mixed batches equal peft: tests/engine), and
    the pool ends empty."""
    root, folders, _, _, base, aeng, _ = lora_server
    rng = random.Random(11)
    names = ["tiny", "sql", "chat"]
    reqs = [([rng.randrange(3, 384) for _ in range(rng.randint(1, 30))], rng.randint(1, 10), names[rng.randrange(3)])
            for _ in range(150)]
    ref = load_model(str(root / "base"))
    llm = LLM(ref, CFG)
    for name, f in folders.items():
        llm.engine.add_adapter(name, f)
    want = [o.text for o in llm.generate([p for p, _, _ in reqs],
                                         [SamplingConfig(max_new_tokens=n, ignore_eos=True) for _, n, _ in reqs],
                                         adapters=[None if m == "tiny" else m for _, _, m in reqs])]
    aborted0 = metric(base, "requests_aborted_total")

    async def one(client, i, sem):  # type: ignore[no-untyped-def]
        prompt, n, model = reqs[i]
        body = {"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
        async with sem:
            if i % 3 == 0:
                body["stream"] = True
                text = ""
                async with client.stream("POST", base + "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data: {"):
                            ch = json.loads(line[6:])
                            assert ch["model"] == model
                            text += ch["choices"][0]["text"]
                            if i % 9 == 0 and n > 2:
                                return None
                return text
            r = await client.post(base + "/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["model"] == model
            return r.json()["choices"][0]["text"]

    async def main():  # type: ignore[no-untyped-def]
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(one(client, i, sem) for i in range(len(reqs))))

    got = asyncio.run(main())
    cancelled = [i for i, g in enumerate(got) if g is None]
    assert cancelled and all(g == want[i] for i, g in enumerate(got) if g is not None)
    assert _idle(base, aeng)
    assert metric(base, "kv_blocks_used") == 0
    assert metric(base, "requests_aborted_total") - aborted0 <= len(cancelled)
