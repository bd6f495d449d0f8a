"""Structured output: the automata against independent oracles (``json`` / ``jsonschema`` for JSON,
Python's ``re`` for regexes), and the engine's constrained outputs parse and validate."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest

from slimlm.engine.llm import LLM
from slimlm.engine.sampling import SamplingConfig
from slimlm.engine.scheduler import SchedulerConfig
from slimlm.engine.structured import JsonGrammar, RegexGrammar, SchemaError, compile_format
from slimlm.loaders import load_model
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6}, "age": {"type": "integer"}, "ok": {"type": "boolean"},
    "kind": {"enum": ["cat", "dog", 7]}, "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    "score": {"type": ["number", "null"]}}, "required": ["name", "age", "kind"]}


def _run(g, text):
    st = g.initial()
    for c in text:
        st = g.step(st, c)
        if st is None:
            return None
    return st


def test_json_automaton_accepts_exactly_what_validates():
    g = JsonGrammar(SCHEMA)
    good = ['{"name": "bob", "age": 3, "kind": "cat"}', '{"kind":7,"age":-12,"name":"a\\"b","tags":[true],"score":1.5e3}',
            '{ "name" : "" , "age" : 0 , "kind" : "dog", "score": null }']
    bad = ['{"age": 3, "kind": "cat"}', '{"name": "bob", "age": 3.5, "kind": "cat"}', '{"name": "1234567", "age": 1, "kind": 7}',
           '{"name":"a","age":1,"kind":"cow"}', '{"name":"a","age":01,"kind":7}', '{"nam":"a"}', '[1]',
           '{"name":"a","age":1,"kind":7,"tags":[true,false,true]}', '{"name":"a","age":1,"kind":7,"age":2}']
    for s in good:
        jsonschema.validate(json.loads(s), SCHEMA)
        st = _run(g, s)
        assert st is not None and g.complete(st), s
    for s in bad:
        st = _run(g, s)
        assert st is None or not g.complete(st), s
    free = compile_format({"type": "json_object"})
    for s in ['{}', '{"a": [1, {"b": null}], "c": "d\\u00e9"}']:
        st = _run(free, s)
        assert st is not None and free.complete(st) and isinstance(json.loads(s), dict)


def test_regex_automaton_equals_python_re():
    rng = random.Random(0)
    pats = [r"\d{3}-\d{2,4}", r"(yes|no)!?", r"[a-c]+x?", r"(ab|c){1,3}", r"[^0-9]{2}", r"\w+@\w+\.com", r"(a|b)*c"]
    for p in pats:
        g = RegexGrammar(p)
        for _ in range(1500):
            s = "".join(rng.choice("abcxy0129-@.com!yesno") for _ in range(rng.randrange(9)))
            st = _run(g, s)
            assert (st is not None and g.accepting(st)) == bool(re.fullmatch(p, s)), (p, s)


@pytest.mark.parametrize("fmt", [
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "date"}}}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}},
    {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {}, "required": ["a"]}}},
    {"type": "json_schema", "json_schema": {"name": "x"}}, {"type": "xml"}, {"type": "regex", "regex": "(a"},
])
def test_invalid_formats_are_refused(fmt):
    with pytest.raises(SchemaError):
        compile_format(fmt)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    tok = make_tiny_tokenizer()
    make_hf_model("llama", folder, vocab_size=tok.vocab_size)
    tok.save(folder)
    return load_model(str(folder))


def test_engine_outputs_parse_and_validate(lm):
    llm = LLM(lm, SchedulerConfig(num_blocks=256, block_size=8))
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    params = [SamplingConfig(max_new_tokens=120, temperature=1.0, seed=s) for s in range(4)] + \
        [SamplingConfig(max_new_tokens=120)]
    outs = llm.generate(["Describe a pet as JSON:"] * 5, params, response_format=fmt)
    for o in outs:
        assert o.finish_reason == "stop", o.text
        jsonschema.validate(json.loads(o.text), SCHEMA)
    outs = llm.generate(["An object:"] * 3, [SamplingConfig(max_new_tokens=160, temperature=0.8, seed=s)
                                            for s in range(3)], response_format={"type": "json_object"})
    done = [o for o in outs if o.finish_reason == "stop"]
    assert done, [o.text for o in outs]
    for o in done:
        assert isinstance(json.loads(o.text), dict)
    outs = llm.generate(["Phone:"], SamplingConfig(max_new_tokens=30, temperature=1.0),
                        response_format={"type": "regex", "regex": r"\d{3}-\d{4}"})
    assert re.fullmatch(r"\d{3}-\d{4}", outs[0].text) and outs[0].finish_reason == "stop"
    pool = llm.engine.scheduler.kv.pool
    assert pool.num_free == pool.num_blocks
