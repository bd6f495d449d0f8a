"""A character-level pushdown automaton for JSON, optionally restricted by a JSON-schema subset.

Why characters: token masks are computed by walking every vocabulary string through the automaton
(:mod:`slimlm.engine.structured.index`), so the automaton only needs ``step(state, char)``. States are
immutable tuples (a stack of frames), hashable, so a state's token mask is computed once and cached.

Schema subset (anything else is refused with a clear error, never ignored): ``type`` (one name or a
list: object, array, string, number, integer, boolean, null), ``properties``, ``required``,
``additionalProperties`` (only used when no ``properties`` are declared: declared properties are the
only keys generated, as OpenAI's strict mode does), ``items``, ``enum``, ``const``, ``minLength`` /
``maxLength``, ``minItems`` / ``maxItems``, ``anyOf`` over branches of distinct types, local ``$ref``
into ``$defs`` / ``definitions`` (not recursive); annotations (title, description, default, ...) are
ignored. Bounds that keep a generation finite: at most ``WS_MAX`` whitespace characters in a row,
15 digits per number part, nesting depth ``MAX_DEPTH`` for free-form values.

Frames (top of stack last): ``V`` a value is expected; ``OK``/``KEY``/``OC``/``ON`` object before a
key / inside a declared key / before ':' / after a member; ``A0``/``AN`` array; ``S`` string; ``N``
number; ``L`` true/false/null; ``E`` enum literal. ``N`` and ``E`` end only when a character that
cannot continue them arrives: then they pop and the character goes to the frame below.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from slimlm.utils.errors import SlimlmError

WS_MAX = 2
MAX_DEPTH = 12
MAX_DIGITS = 15
_WS = " \t\n\r"
_TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")
_ANNOTATIONS = {"title", "description", "$schema", "$id", "$comment", "default", "examples", "deprecated",
                "readOnly", "writeOnly", "strict", "$defs", "definitions"}
_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "enum", "const", "minLength",
             "maxLength", "minItems", "maxItems", "anyOf", "$ref"}


class SchemaError(SlimlmError):
    """A response_format schema that is invalid or outside the supported subset (HTTP 400)."""


@dataclass
class Node:
    types: frozenset[str]
    props: dict[str, int] = field(default_factory=dict)  # escaped key -> node id
    required: frozenset[str] = frozenset()  # escaped keys
    additional: int | None = None  # node id of free-key values (no declared properties)
    items: int | None = None
    enum: tuple[str, ...] | None = None  # compact JSON literals
    min_len: int = 0
    max_len: int | None = None
    min_items: int = 0
    max_items: int | None = None


class JsonGrammar:
    """``initial()``, ``step(state, ch) -> state | None``, ``accepting(state)``, ``complete(state)``."""

    def __init__(self, schema: dict[str, Any] | None = None, free_root_object: bool = True):
        self.nodes: list[Node] = []
        self._root_schema = schema
        self._resolving: set[str] = set()
        if schema is None:  # json_object: any JSON object
            any_id = self._any()
            self.root = len(self.nodes)
            self.nodes.append(Node(frozenset({"object"}), additional=any_id))
        else:
            self.root = self._compile(schema, "#")
        self.key = json.dumps(schema, sort_keys=True) if schema is not None else "json_object"

    # --- schema -> nodes ---------------------------------------------------------------------------
    def _any(self) -> int:
        i = len(self.nodes)
        self.nodes.append(Node(frozenset(_TYPES)))
        self.nodes[i].additional, self.nodes[i].items = i, i
        return i

    def _compile(self, s: Any, where: str) -> int:
        if s is True or s == {}:
            return self._any()
        if not isinstance(s, dict):
            raise SchemaError(f"{where}: a schema must be an object, got {type(s).__name__}")
        unknown = sorted(set(s) - _KEYWORDS - _ANNOTATIONS)
        if unknown:
            raise SchemaError(f"{where}: unsupported schema keyword {unknown[0]!r} (supported: {', '.join(sorted(_KEYWORDS))})")
        if "$ref" in s:
            return self._ref(s["$ref"], where)
        if "anyOf" in s:
            return self._any_of(s, where)
        if "enum" in s or "const" in s:
            vals = [s["const"]] if "const" in s else s["enum"]
            if not isinstance(vals, list) or not vals:
                raise SchemaError(f"{where}: enum must be a non-empty list")
            lits = tuple(dict.fromkeys(json.dumps(v, separators=(",", ":"), ensure_ascii=False) for v in vals))
            i = len(self.nodes)
            self.nodes.append(Node(frozenset(_TYPES), enum=lits))
            return i
        t = s.get("type")
        if t is None:
            types = set(_TYPES)
        else:
            names = t if isinstance(t, list) else [t]
            if not names or not all(isinstance(n, str) and n in _TYPES for n in names):
                raise SchemaError(f"{where}: type must be one of {', '.join(_TYPES)} (or a list of them), got {t!r}")
            types = set(names)
        node = Node(frozenset(types))
        i = len(self.nodes)
        self.nodes.append(node)
        for k in ("minLength", "maxLength", "minItems", "maxItems"):
            if k in s and (not isinstance(s[k], int) or isinstance(s[k], bool) or s[k] < 0):
                raise SchemaError(f"{where}: {k} must be a non-negative integer")
        node.min_len, node.max_len = s.get("minLength", 0), s.get("maxLength")
        node.min_items, node.max_items = s.get("minItems", 0), s.get("maxItems")
        if node.max_len is not None and node.max_len < node.min_len or \
                node.max_items is not None and node.max_items < node.min_items:
            raise SchemaError(f"{where}: a maximum is below its minimum")
        if "object" in types:
            props = s.get("properties", {})
            if not isinstance(props, dict):
                raise SchemaError(f"{where}: properties must be an object")
            req = s.get("required", [])
            if not isinstance(req, list) or not all(isinstance(r, str) for r in req):
                raise SchemaError(f"{where}: required must be a list of property names")
            missing = [r for r in req if props and r not in props]
            if missing:
                raise SchemaError(f"{where}: required property {missing[0]!r} is not declared in properties")
            esc = {json.dumps(k, ensure_ascii=False)[1:-1]: k for k in props}
            node.props = {e: self._compile(props[k], f"{where}/properties/{k}") for e, k in esc.items()}
            node.required = frozenset(json.dumps(r, ensure_ascii=False)[1:-1] for r in req)
            if not props:
                add = s.get("additionalProperties", True)
                if add is False:
                    node.additional = None
                else:
                    node.additional = self._compile(add, f"{where}/additionalProperties")
                if req:
                    raise SchemaError(f"{where}: required properties must be declared in properties")
        if "array" in types:
            node.items = self._compile(s.get("items", {}), f"{where}/items")
        return i

    def _ref(self, ref: Any, where: str) -> int:
        if not isinstance(ref, str) or not (ref.startswith("#/$defs/") or ref.startswith("#/definitions/")):
            raise SchemaError(f"{where}: only local $ref into #/$defs or #/definitions is supported, got {ref!r}")
        if ref in self._resolving:
            raise SchemaError(f"{where}: recursive $ref {ref!r} is not supported")
        _, section, name = ref.split("/", 2)
        target = (self._root_schema or {}).get(section, {}).get(name)
        if target is None:
            raise SchemaError(f"{where}: $ref {ref!r} does not resolve")
        self._resolving.add(ref)
        try:
            return self._compile(target, ref)
        finally:
            self._resolving.discard(ref)

    def _any_of(self, s: dict[str, Any], where: str) -> int:
        branches = s["anyOf"]
        if not isinstance(branches, list) or not branches:
            raise SchemaError(f"{where}: anyOf must be a non-empty list")
        ids = [self._compile(b, f"{where}/anyOf/{j}") for j, b in enumerate(branches)]
        merged = Node(frozenset())
        for j in ids:
            n = self.nodes[j]
            if n.enum is not None or n.types & merged.types or ({"number", "integer"} <= n.types | merged.types):
                raise SchemaError(f"{where}: anyOf branches must have distinct types (no enums)")
            merged.types = merged.types | n.types
            if "object" in n.types:
                merged.props, merged.required, merged.additional = n.props, n.required, n.additional
            if "array" in n.types:
                merged.items, merged.min_items, merged.max_items = n.items, n.min_items, n.max_items
            if "string" in n.types:
                merged.min_len, merged.max_len = n.min_len, n.max_len
        i = len(self.nodes)
        self.nodes.append(merged)
        return i

    # --- the automaton -----------------------------------------------------------------------------
    def initial(self) -> tuple[Any, ...]:
        return (("V", self.root, 0),)

    def complete(self, state: tuple[Any, ...]) -> bool:
        return not state

    def accepting(self, state: tuple[Any, ...]) -> bool:
        """The text so far is a whole value (a number or enum may still grow)."""
        while state and self._lazy_done(state[-1]):
            state = state[:-1]
        return not state

    def _lazy_done(self, f: tuple[Any, ...]) -> bool:
        if f[0] == "N":
            return f[2] in ("zero", "int", "frac", "exp")
        if f[0] == "E":
            return f[2] in self.nodes[f[1]].enum  # type: ignore[operator]
        return False

    def step(self, state: tuple[Any, ...], c: str) -> tuple[Any, ...] | None:
        while state:
            r = self._frame(state, c)
            if r is not None or not self._lazy_done(state[-1]):
                return r
            state = state[:-1]  # the number / enum literal ended: c belongs to the frame below
        return None

    def _frame(self, st: tuple[Any, ...], c: str) -> tuple[Any, ...] | None:  # noqa: C901 (one table)
        f, rest = st[-1], st[:-1]
        kind = f[0]
        if kind == "V":
            return self._value(rest, f[1], f[2], c)
        node = self.nodes[f[1]] if kind not in ("L",) else None
        if kind == "S":
            _, nid, n, esc = f
            assert node is not None
            limited = node.max_len is not None or node.min_len > 0
            if esc == 0:
                if c == '"':
                    return rest if n >= node.min_len else None
                if node.max_len is not None and n >= node.max_len:
                    return None
                if c == "\\":
                    return rest + (("S", nid, n, 1),)
                if ord(c) < 0x20:
                    return None
                return rest + (("S", nid, n + 1 if limited else 0, 0),)
            if esc == 1:
                if c in '"\\/bfnrt':
                    return rest + (("S", nid, n + 1 if limited else 0, 0),)
                return rest + (("S", nid, n, 2),) if c == "u" else None
            if c not in "0123456789abcdefABCDEF":
                return None
            return rest + (("S", nid, n + 1 if limited else 0, 0),) if esc == 5 else rest + (("S", nid, n, esc + 1),)
        if kind == "N":
            return self._number(rest, f, c)
        if kind == "L":
            if c != f[1][0]:
                return None
            return rest if len(f[1]) == 1 else rest + (("L", f[1][1:]),)
        if kind == "E":
            assert node is not None and node.enum is not None
            new = f[2] + c
            if not any(x.startswith(new) for x in node.enum):
                return None
            if new in node.enum and not any(x != new and x.startswith(new) for x in node.enum):
                return rest
            return rest + (("E", f[1], new),)
        assert node is not None
        if c in _WS and kind in ("OK", "OC", "ON", "A0", "AN"):
            ws = f[-1]
            return rest + (f[:-1] + (ws + 1,),) if ws < WS_MAX else None
        if kind == "OK":  # ("OK", nid, used, first, ws)
            _, nid, used, first, _ = f
            if c == "}":
                return rest if first and node.required <= set(used) else None
            if c != '"':
                return None
            if not node.props:
                if node.additional is None:
                    return None
                return rest + (("OC", nid, used, None, 0), ("S", self._free_key(), 0, 0))
            return rest + (("KEY", nid, used, ""),) if self._left(node, used) else None
        if kind == "KEY":  # ("KEY", nid, used, buf)
            _, nid, used, buf = f
            left = self._left(node, used)
            if c == '"':
                return rest + (("OC", nid, used, buf, 0),) if buf in left else None
            new = buf + c
            return rest + (("KEY", nid, used, new),) if any(k.startswith(new) for k in left) else None
        if kind == "OC":  # ("OC", nid, used, key, ws)
            _, nid, used, key, _ = f
            if c != ":":
                return None
            child = node.additional if key is None else node.props[key]
            used2 = used if key is None else tuple(sorted(used + (key,)))
            assert child is not None
            return rest + (("ON", nid, used2, 0), ("V", child, 0))
        if kind == "ON":  # ("ON", nid, used, ws)
            _, nid, used, _ = f
            if c == "}":
                return rest if node.required <= set(used) else None
            if c == ",":
                ok = not node.props or self._left(node, used)
                return rest + (("OK", nid, used, False, 0),) if ok else None
            return None
        if kind == "A0":  # ("A0", nid, count, ws)
            if c == "]":
                return rest if node.min_items == 0 else None
            if node.max_items == 0:
                return None
            assert node.items is not None
            return self.step(rest + (("AN", f[1], 1, 0), ("V", node.items, 0)), c)
        if kind == "AN":
            _, nid, count, _ = f
            if c == "]":
                return rest if count >= node.min_items else None
            if c == "," and (node.max_items is None or count < node.max_items):
                assert node.items is not None
                return rest + (("AN", nid, count + 1, 0), ("V", node.items, 0))
            return None
        raise AssertionError(f"unknown frame {f!r}")

    def _free_key(self) -> int:
        """Node id of an unconstrained string (free object keys)."""
        if not hasattr(self, "_fk"):
            self._fk = len(self.nodes)
            self.nodes.append(Node(frozenset({"string"})))
        return self._fk

    @staticmethod
    def _left(node: Node, used: tuple[str, ...]) -> list[str]:
        return [k for k in node.props if k not in used]

    def _value(self, rest: tuple[Any, ...], nid: int, ws: int, c: str) -> tuple[Any, ...] | None:
        node = self.nodes[nid]
        if c in _WS:
            return rest + (("V", nid, ws + 1),) if ws < WS_MAX else None
        if node.enum is not None:
            return self._frame(rest + (("E", nid, ""),), c)
        t = node.types
        deep = len(rest) >= 2 * MAX_DEPTH
        if c == "{" and "object" in t and not deep:
            return rest + (("OK", nid, (), True, 0),)
        if c == "[" and "array" in t and not deep:
            return rest + (("A0", nid, 0, 0),)
        if c == '"' and "string" in t:
            return rest + (("S", nid, 0, 0),)
        if (c == "-" or c.isdigit()) and c.isascii() and t & {"number", "integer"}:
            phase = "sign" if c == "-" else "zero" if c == "0" else "int"
            return rest + (("N", nid, phase, 1 if phase == "int" else 0),)
        lit = {"t": ("boolean", "rue"), "f": ("boolean", "alse"), "n": ("null", "ull")}.get(c)
        if lit is not None and lit[0] in t:
            return rest + (("L", lit[1]),)
        return None

    def _number(self, rest: tuple[Any, ...], f: tuple[Any, ...], c: str) -> tuple[Any, ...] | None:
        _, nid, phase, nd = f
        real = "number" in self.nodes[nid].types
        digit = c.isascii() and c.isdigit()

        def to(p: str, n: int) -> tuple[Any, ...]:
            return rest + (("N", nid, p, n),)

        if phase == "sign":
            return to("zero", 0) if c == "0" else to("int", 1) if digit else None
        if phase in ("zero", "int"):
            if digit and phase == "int" and nd < MAX_DIGITS:
                return to("int", nd + 1)
            if real and c == ".":
                return to("dot", 0)
            return to("e", 0) if real and c in "eE" else None
        if phase in ("dot", "frac"):
            if digit and nd < MAX_DIGITS:
                return to("frac", nd + 1)
            return to("e", 0) if phase == "frac" and c in "eE" else None
        if phase == "e":
            return to("esign", 0) if c in "+-" else to("exp", 1) if digit else None
        if phase in ("esign", "exp"):
            return to("exp", nd + 1) if digit and nd < 3 else None
        return None
