"""Structured output: ``response_format`` enforced by token masks over the tokenizer's vocabulary.

How: a grammar is a character-level automaton with hashable states (:class:`JsonGrammar` for
``json_object`` / ``json_schema``, :class:`RegexGrammar` for ``regex``). :class:`StructuredIndex`
holds every token's text in a trie, once per engine; the mask of a state is found by walking the trie
from that state (a branch stops at the first character the grammar rejects), then cached per
(grammar, state), so a state seen before costs one dictionary lookup. The engine applies the mask
(forbidden tokens -> -inf) before argmax / sampling; the sequence feeds each chosen token's text to
the automaton and finishes (reason ``stop``) when the value is complete. End tokens are allowed only
where the text so far is a whole value. Tokens whose text is not whole characters (pieces of a
multi-byte UTF-8 character) and special tokens are never allowed.

Example::

    llm.engine.add_request(ids, SamplingConfig(max_new_tokens=64),
                           response_format={"type": "json_schema", "json_schema": {"schema": {
                               "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}}})
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from slimlm.engine.structured.json_grammar import JsonGrammar, SchemaError
from slimlm.engine.structured.regex_grammar import RegexGrammar
from slimlm.utils.errors import SlimlmError

Grammar = JsonGrammar | RegexGrammar


def compile_format(fmt: Any) -> Grammar:
    """The grammar of an OpenAI-style ``response_format`` (``{"type": "json_object"}``,
    ``{"type": "json_schema", "json_schema": {"schema": {...}}}``, or slimlm's ``{"type": "regex",
    "regex": "..."}``). Raises SchemaError (a SlimlmError) for anything invalid or unsupported."""
    if not isinstance(fmt, dict):
        raise SchemaError("response_format must be an object")
    kind = fmt.get("type")
    if kind == "json_object":
        return JsonGrammar(None)
    if kind == "json_schema":
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
            raise SchemaError("response_format json_schema needs {\"json_schema\": {\"name\": ..., \"schema\": {...}}}")
        return JsonGrammar(js["schema"])
    if kind == "regex":
        pattern = fmt.get("regex")
        if not isinstance(pattern, str) or not pattern:
            raise SchemaError("response_format regex needs {\"regex\": \"PATTERN\"}")
        return RegexGrammar(pattern)
    raise SchemaError(f"response_format type must be text, json_object, json_schema or regex, got {kind!r}")


class StructuredIndex:
    """Token texts in a trie plus the per-state mask cache, for one tokenizer."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int], cache_size: int = 4096):
        self.vocab_size = vocab_size
        self.eos = sorted(t for t in eos_ids if t < vocab_size)
        special = set(self.eos) | set(getattr(tokenizer, "all_special_ids", []) or [])
        self.text: dict[int, str] = {}
        self.trie: dict[str, Any] = {}
        for t in range(min(vocab_size, tokenizer.vocab_size)):
            if t in special:
                continue
            s = tokenizer.decode([t], skip_special_tokens=True)
            piece = tokenizer.id_to_token(t) or ""
            if piece.startswith("\u2581") and not s.startswith(" "):  # sentencepiece word start
                s = " " + s
            if not s or "\ufffd" in s:
                continue
            self.text[t] = s
            node = self.trie
            for ch in s:
                node = node.setdefault(ch, {})
            node.setdefault("", []).append(t)  # "" never is a character key
        self._cache: OrderedDict[tuple[str, Any], torch.Tensor] = OrderedDict()
        self.cache_size = cache_size
        self.stats = {"mask_hits": 0, "mask_misses": 0}

    def constraint(self, grammar: Grammar) -> Constraint:
        return Constraint(self, grammar)

    def mask(self, grammar: Grammar, state: Any) -> torch.Tensor:
        """bool [V]: the tokens whose whole text the grammar accepts from ``state``."""
        key = (grammar.key, state)
        m = self._cache.get(key)
        if m is not None:
            self._cache.move_to_end(key)
            self.stats["mask_hits"] += 1
            return m
        self.stats["mask_misses"] += 1
        allowed: list[int] = []
        todo = [(self.trie, state)]
        while todo:
            node, st = todo.pop()
            for ch, child in node.items():
                if ch == "":
                    continue
                nxt = grammar.step(st, ch)
                if nxt is None:
                    continue
                allowed.extend(child.get("", ()))
                todo.append((child, nxt))
        if grammar.accepting(state) or not allowed:  # a dead end can only stop
            allowed.extend(self.eos)
        m = torch.zeros(self.vocab_size, dtype=torch.bool)
        if allowed:
            m[torch.tensor(allowed, dtype=torch.long)] = True
        self._cache[key] = m
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return m


class Constraint:
    """One request's automaton state: ``mask()`` before choosing, ``advance(token)`` after."""

    def __init__(self, index: StructuredIndex, grammar: Grammar):
        self.index = index
        self.grammar: Any = grammar  # JsonGrammar | RegexGrammar: each takes only its own states
        self.state: Any = grammar.initial()

    def mask(self) -> torch.Tensor:
        return self.index.mask(self.grammar, self.state)

    def advance(self, token: int) -> bool:
        """Feed a chosen token; True when the value is complete (nothing more may follow)."""
        text = self.index.text.get(token)
        if text is None:
            raise SlimlmError(f"token {token} is not allowed by the response format")
        st = self.state
        for ch in text:
            st = self.grammar.step(st, ch)
            if st is None:
                raise SlimlmError(f"token {token} ({text!r}) breaks the response format")
        self.state = st
        return self.grammar.complete(st)


__all__ = ["Constraint", "JsonGrammar", "RegexGrammar", "SchemaError", "StructuredIndex", "compile_format"]
