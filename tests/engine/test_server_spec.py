"""``response_format`` and speculative decoding through ``slimlm serve``'s app, with the official
``openai`` client (jsonschema and ``json`` as oracles; plain greedy ``generate`` for speculation)."""

from __future__ import annotations

import json

import httpx2 as httpx
import jsonschema
import pytest

from slimlm.engine.generate import generate
from slimlm.engine.llm import LLMEngine
from slimlm.engine.sampling import SamplingConfig
from slimlm.engine.scheduler import SchedulerConfig
from slimlm.engine.spec import SpecConfig
from slimlm.loaders import load_model
from slimlm.server.async_engine import AsyncEngine
from tests.helpers.models import make_hf_model
from tests.helpers.server import metric as _metric
from tests.helpers.server import serving
from tests.helpers.tokenizers import make_tiny_tokenizer

SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                           "population": {"type": "integer"}, "capital": {"type": "boolean"}},
          "required": ["city", "population", "capital"]}


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tok = make_tiny_tokenizer()
    make_hf_model("llama", folder, vocab_size=tok.vocab_size)
    tok.save(folder)
    lm = load_model(str(folder))
    eng = LLMEngine(lm.model, lm.tokenizer, SchedulerConfig(num_blocks=128, block_size=4, max_num_batched_tokens=64),
                    spec=SpecConfig(spec="ngram", num_speculative_tokens=3, spec_adaptive=False))
    aeng = AsyncEngine(eng)
    with serving(aeng, lm.tokenizer) as (client, base):
        yield lm, client, base, aeng


def test_response_format_json_schema_and_json_object(spec_server):
    _, client, _, _ = spec_server
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": SCHEMA, "strict": True}}
    c = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "A city as JSON"}],
                                       max_tokens=100, temperature=0.9, seed=1, response_format=fmt)
    assert c.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(c.choices[0].message.content), SCHEMA)
    r = client.completions.create(model="tiny", prompt="{", max_tokens=120, temperature=1.0, n=4, seed=0,
                                  extra_body={"response_format": {"type": "json_object"}})
    done = [ch.text for ch in r.choices if ch.finish_reason == "stop"]  # free-form strings may run to length
    assert done
    for text in done:
        assert isinstance(json.loads(text), dict)
    msgs = [{"role": "user", "content": "x"}]
    full = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=100, temperature=0,
                                          response_format=fmt).choices[0].message.content
    chunks = list(client.chat.completions.create(model="tiny", messages=msgs, max_tokens=100, temperature=0,
                                                 response_format=fmt, stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full
    jsonschema.validate(json.loads(full), SCHEMA)


def test_speculative_decoding_through_the_server(spec_server):
    lm, client, base, aeng = spec_server
    prompt = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return"
    ids = lm.tokenizer.encode(prompt)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                  extra_body={"ignore_eos": True})
    plain = generate(lm.model, lm.tokenizer, [ids], SamplingConfig(max_new_tokens=24, ignore_eos=True))
    assert r.choices[0].text == plain.texts[0] and r.usage.completion_tokens == 24
    assert _metric(base, "spec_draft_tokens_total") > 0
    rate = _metric(base, "spec_acceptance_rate")
    assert 0.0 <= rate <= 1.0 and _metric(base, "spec_tokens_per_step") >= 1.0
    assert _metric(base, "generation_tokens_total") >= 24
    assert httpx.get(base + "/health").status_code == 200
    pool = aeng.engine.scheduler.kv.pool
    assert pool.num_free == pool.num_blocks
