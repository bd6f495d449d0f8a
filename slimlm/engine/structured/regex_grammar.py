"""A regular expression as a character automaton: a Thompson NFA whose state is the set of live NFA
states (hashable, so token masks cache per state).

Supported: literals, ``.``, escapes ``\\d \\w \\s \\D \\W \\S`` and escaped metacharacters, classes
``[a-z_]`` / ``[^...]``, groups ``(...)`` / ``(?:...)``, ``|``, ``* + ?`` and ``{m}``, ``{m,}``,
``{m,n}``; the pattern must match the whole output (a leading ``^`` / trailing ``$`` is allowed).
Anything else (backreferences, lookaround, lazy quantifiers) is refused.
"""

from __future__ import annotations

from typing import Any

from slimlm.engine.structured.json_grammar import SchemaError

_CLASSES = {"d": lambda c: c.isdigit() and c.isascii(), "w": lambda c: c.isalnum() or c == "_",
            "s": lambda c: c in " \t\n\r\f\v"}


class _Parser:
    def __init__(self, pattern: str):
        self.p, self.i = pattern, 0
        self.trans: list[list[tuple[Any, int]]] = []  # state -> [(matcher | None (epsilon), next)]

    def new(self) -> int:
        self.trans.append([])
        return len(self.trans) - 1

    def peek(self) -> str | None:
        return self.p[self.i] if self.i < len(self.p) else None

    def take(self) -> str:
        if self.i >= len(self.p):
            raise SchemaError(f"regex {self.p!r}: unexpected end")
        c = self.p[self.i]
        self.i += 1
        return c

    # each parse returns a fragment (start, end)
    def alt(self) -> tuple[int, int]:
        frags = [self.seq()]
        while self.peek() == "|":
            self.i += 1
            frags.append(self.seq())
        if len(frags) == 1:
            return frags[0]
        s, e = self.new(), self.new()
        for a, b in frags:
            self.trans[s].append((None, a))
            self.trans[b].append((None, e))
        return s, e

    def seq(self) -> tuple[int, int]:
        s = e = self.new()
        while self.peek() not in (None, "|", ")"):
            a, b = self.repeat()
            self.trans[e].append((None, a))
            e = b
        return s, e

    def repeat(self) -> tuple[int, int]:
        start = self.i
        frag = self.atom()
        end = self.i
        c = self.peek()
        if c in ("*", "+", "?"):
            self.i += 1
            lo, hi = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
        elif c == "{":
            close = self.p.find("}", self.i)
            body = self.p[self.i + 1:close] if close > 0 else ""
            parts = body.split(",")
            if close < 0 or len(parts) > 2 or not parts[0].isdigit() or (len(parts) == 2 and parts[1] and not parts[1].isdigit()):
                raise SchemaError(f"regex {self.p!r}: bad repetition at {self.i}")
            self.i = close + 1
            lo = int(parts[0])
            hi = lo if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
            if hi is not None and (hi < lo or hi > 1000):
                raise SchemaError(f"regex {self.p!r}: bad repetition bounds {body}")
        else:
            return frag
        if self.peek() in ("?", "+"):
            raise SchemaError(f"regex {self.p!r}: lazy/possessive quantifiers are not supported")
        sub = self.p[start:end]
        copies = [frag] + [self._reparse(sub) for _ in range(max(lo, 1 if hi is None else hi) - 1)]
        s = e = self.new()
        for k, (a, b) in enumerate(copies):
            self.trans[e].append((None, a))
            if k >= lo:  # an optional copy may be skipped
                self.trans[e].append((None, b))
            e = b
        if hi is None:  # the last copy repeats
            a, b = copies[-1]
            self.trans[b].append((None, a))
        return s, e

    def _reparse(self, sub: str) -> tuple[int, int]:
        save = self.p, self.i
        self.p, self.i = sub, 0
        frag = self.atom()
        self.p, self.i = save
        return frag

    def atom(self) -> tuple[int, int]:
        c = self.take()
        if c == "(":
            if self.p.startswith("?:", self.i):
                self.i += 2
            elif self.peek() == "?":
                raise SchemaError(f"regex {self.p!r}: lookaround / named groups are not supported")
            frag = self.alt()
            if self.take() != ")":
                raise SchemaError(f"regex {self.p!r}: missing ')'")
            return frag
        if c in ")*+?{|":
            raise SchemaError(f"regex {self.p!r}: unexpected {c!r} at {self.i - 1}")
        if c == "[":
            m = self.klass()
        elif c == ".":
            def m(x: str) -> bool:
                return x != "\n"
        elif c == "\\":
            m = self.escape()
        else:
            def m(x: str, c: str = c) -> bool:
                return x == c
        s, e = self.new(), self.new()
        self.trans[s].append((m, e))
        return s, e

    def escape(self) -> Any:
        c = self.take()
        if c.lower() in _CLASSES:
            f = _CLASSES[c.lower()]
            return f if c.islower() else (lambda x: not f(x))
        if c.isalnum() and c not in "nt":
            raise SchemaError(f"regex {self.p!r}: escape \\{c} is not supported")
        lit = {"n": "\n", "t": "\t"}.get(c, c)
        return lambda x: x == lit

    def klass(self) -> Any:
        neg = self.peek() == "^"
        if neg:
            self.i += 1
        parts: list[Any] = []
        first = True
        while True:
            c = self.take()
            if c == "]" and not first:
                break
            first = False
            if c == "\\":
                parts.append(self.escape())
                continue
            if self.peek() == "-" and self.i + 1 < len(self.p) and self.p[self.i + 1] != "]":
                self.i += 1
                hi = self.take()
                parts.append(lambda x, lo=c, hi=hi: lo <= x <= hi)
            else:
                parts.append(lambda x, c=c: x == c)
        return lambda x: neg != any(p(x) for p in parts)


class RegexGrammar:
    """``initial()``, ``step(state, ch)``, ``accepting(state)``, ``complete(state)`` over a regex."""

    def __init__(self, pattern: str):
        body = pattern[1:] if pattern.startswith("^") else pattern
        if body.endswith("$") and not body.endswith("\\$"):
            body = body[:-1]
        parser = _Parser(body)
        self.start, self.accept = parser.alt()
        if parser.i != len(body):
            raise SchemaError(f"regex {pattern!r}: unexpected {body[parser.i]!r} at {parser.i}")
        self.trans = parser.trans
        self.key = "regex:" + pattern

    def _closure(self, states: set[int]) -> frozenset[int]:
        todo, seen = list(states), set(states)
        while todo:
            s = todo.pop()
            for m, t in self.trans[s]:
                if m is None and t not in seen:
                    seen.add(t)
                    todo.append(t)
        return frozenset(seen)

    def initial(self) -> frozenset[int]:
        return self._closure({self.start})

    def step(self, state: frozenset[int], c: str) -> frozenset[int] | None:
        nxt = {t for s in state for m, t in self.trans[s] if m is not None and m(c)}
        return self._closure(nxt) if nxt else None

    def accepting(self, state: frozenset[int]) -> bool:
        return self.accept in state

    def complete(self, state: frozenset[int]) -> bool:
        """Accepting with no character able to follow."""
        return self.accepting(state) and not any(m is not None for s in state for m, _ in self.trans[s])
