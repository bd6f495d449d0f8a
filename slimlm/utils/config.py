"""Typed, versioned configs that round-trip to JSON/YAML and generate CLI flags.

Every capability takes one config dataclass (``quantize_(model, GPTQConfig(...))``). A recipe file
is just serialized configs. Subclass :class:`BaseConfig` with ``@dataclass`` and give each field a
``metadata={"help": ...}``; ``add_arguments``/``from_args`` turn the fields into argparse flags, so
CLI flags always come from the config and are never parsed at import time.

Numeric fields declare their range in the same metadata: ``"min"``/``"max"`` (inclusive) and
``"gt"``/``"lt"`` (strict), e.g. ``metadata={"help": ..., "min": 2, "max": 8}``. The range is
enforced on every construction (``__post_init__``, so recipes and ``from_dict`` too, naming the
key) and by the generated flag's argparse type (:class:`NumberArg`, so a bad flag fails at parse
time: one ``error:`` line naming the flag, exit 2). Non-finite floats (nan, inf) are always refused.

Example::

    @register_config
    @dataclass
    class GPTQConfig(BaseConfig):
        kind: ClassVar[str] = "gptq"
        bits: int = field(default=4, metadata={"help": "bits per weight (2-8)"})

    cfg = GPTQConfig.from_dict({"bits": 3})
    assert BaseConfig.load_any(cfg.to_dict()) == cfg
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union, get_args, get_origin

import yaml

from slimlm.utils.errors import ConfigError

T = TypeVar("T", bound="BaseConfig")
_CONFIGS: dict[str, type[BaseConfig]] = {}


def register_config(cls: type[T]) -> type[T]:
    """Class decorator: make ``cls`` loadable by its ``kind`` from recipes."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} has no kind")
    _CONFIGS[cls.kind] = cls
    return cls


def config_kinds() -> dict[str, type[BaseConfig]]:
    return dict(_CONFIGS)


# --- numeric ranges -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Bounds:
    """An allowed numeric range: ``min <= v <= max``, ``gt < v < lt`` (None = unbounded); always finite."""

    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None

    @classmethod
    def from_metadata(cls, metadata: Any) -> Bounds:
        return cls(**{k: metadata[k] for k in ("min", "max", "gt", "lt") if k in metadata})

    @property
    def bounded(self) -> bool:
        return any(v is not None for v in (self.min, self.max, self.gt, self.lt))

    def describe(self) -> str:
        """``in [2, 8]``, ``in (0, 1]``, ``>= 1``, ``> 0``, ... (empty when unbounded)."""
        lo = f"[{self.min:g}" if self.min is not None else f"({self.gt:g}" if self.gt is not None else None
        hi = f"{self.max:g}]" if self.max is not None else f"{self.lt:g})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return (">= " if lo[0] == "[" else "> ") + lo[1:]
        if hi:
            return ("<= " if hi[-1] == "]" else "< ") + hi[:-1]
        return ""

    def violation(self, value: float) -> str | None:
        """None when ``value`` is allowed, else what it must be (for the error line)."""
        ok = math.isfinite(value)
        ok = ok and (self.min is None or value >= self.min) and (self.max is None or value <= self.max)
        ok = ok and (self.gt is None or value > self.gt) and (self.lt is None or value < self.lt)
        if ok:
            return None
        if math.isfinite(value):
            return f"must be {self.describe()}"
        return f"must be a finite number {self.describe()}".rstrip()


class NumberArg:
    """argparse ``type=``: parse an int (no "1.5") or a finite float and check its :class:`Bounds`.

    ``NumberArg(int, min=1)``; argparse turns the ArgumentTypeError into ``error: argument --flag: ...``.
    """

    def __init__(self, kind: type, bounds: Bounds | None = None, **limits: float) -> None:
        if kind not in (int, float):
            raise TypeError(f"NumberArg takes int or float, not {kind!r}")
        self.kind = kind
        self.bounds = bounds or Bounds(**limits)
        self.__name__ = kind.__name__  # argparse names the type in some messages

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        return f"{what} {self.bounds.describe()}".rstrip()

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects {self.describe()}, got {text!r}") from None
        if self.bounds.violation(value) is not None:
            raise argparse.ArgumentTypeError(f"expects {self.describe()}, got {text!r}")
        return value

    def __repr__(self) -> str:
        return f"NumberArg({self.kind.__name__}, {self.bounds})"


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _coerce(name: str, tp: Any, value: Any, owner: str) -> Any:
    """Check/convert a JSON value to the field type; raise ConfigError naming the key."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{owner}: '{name}' must not be null")
    origin = get_origin(base)
    try:
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise TypeError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if base is float:
            if isinstance(value, bool):
                raise TypeError
            return float(value)
        if base is str:
            if not isinstance(value, str):
                raise TypeError
            return value
        if origin is typing.Literal:
            if value not in get_args(base):
                raise ConfigError(f"{owner}: '{name}' must be one of {list(get_args(base))}, got {value!r}")
            return value
        if origin in (list, tuple):
            (item_tp,) = get_args(base)[:1] or (Any,)
            if not isinstance(value, (list, tuple)):
                raise TypeError
            items = [_coerce(f"{name}[{i}]", item_tp, v, owner) if item_tp is not Any else v for i, v in enumerate(value)]
            return items if origin is list else tuple(items)
        if origin is dict or base is dict:
            if not isinstance(value, dict):
                raise TypeError
            return dict(value)
        if isinstance(base, type) and issubclass(base, BaseConfig):
            return base.from_dict(value) if isinstance(value, dict) else value
    except (TypeError, ValueError):
        raise ConfigError(f"{owner}: '{name}' expects {getattr(base, '__name__', base)}, got {value!r}") from None
    return value


@dataclasses.dataclass
class BaseConfig:
    """Base for typed configs: ``kind`` names it in recipes, ``version`` guards the schema."""

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self._check_bounds()
        self.validate()

    def _check_bounds(self) -> None:
        """Enforce the ``min``/``max``/``gt``/``lt`` field metadata and finiteness of numbers."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            why = Bounds.from_metadata(f.metadata).violation(v)
            if why is not None:
                raise ConfigError(f"{self.kind or type(self).__name__}: '{f.name}' {why}, got {v!r}")

    def validate(self) -> None:
        """Override to check value ranges; raise ConfigError with one clear line."""

    # --- serialization -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "version": self.version}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, BaseConfig):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        if not isinstance(data, dict):
            raise ConfigError(f"{cls.kind or cls.__name__} config must be a mapping, got {type(data).__name__}")
        data = dict(data)
        kind = data.pop("kind", cls.kind)
        if cls.kind and kind != cls.kind:
            raise ConfigError(f"config kind {kind!r} given to {cls.kind!r}")
        version = data.pop("version", cls.version)
        if version != cls.version:
            raise ConfigError(f"{cls.kind}: config version {version} not supported (this slimlm reads {cls.version})")
        hints = typing.get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{cls.kind or cls.__name__}: unknown key {unknown[0]!r}; allowed keys: {', '.join(sorted(fields))}"
            )
        kwargs = {k: _coerce(k, hints[k], v, cls.kind or cls.__name__) for k, v in data.items()}
        return cls(**kwargs)

    @staticmethod
    def load_any(data: dict[str, Any]) -> BaseConfig:
        """Build whichever registered config ``data['kind']`` names."""
        kind = data.get("kind") if isinstance(data, dict) else None
        if kind not in _CONFIGS:
            raise ConfigError(f"unknown config kind {kind!r}; known: {', '.join(sorted(_CONFIGS))}")
        return _CONFIGS[kind].from_dict(data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    # --- CLI -----------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        """Add one ``--field-name`` flag per field (default None = keep the config default)."""
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if not f.init or f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            tp, _ = _strip_optional(hints[f.name])
            help_ = f.metadata.get("help", "")
            default = f.default if f.default is not dataclasses.MISSING else None
            help_ = f"{help_} (default: {default})" if help_ else f"(default: {default})"
            if tp is bool:
                parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_)
            elif get_origin(tp) is typing.Literal:
                parser.add_argument(flag, dest=f.name, choices=list(get_args(tp)), default=None, help=help_)
            elif get_origin(tp) in (list, tuple) or tp is dict or get_origin(tp) is dict:
                parser.add_argument(flag, dest=f.name, type=json.loads, default=None, help=help_ + " [JSON]")
            elif tp in (int, float):
                parser.add_argument(flag, dest=f.name, type=NumberArg(tp, Bounds.from_metadata(f.metadata)),
                                    default=None, help=help_)
            elif tp is str:
                parser.add_argument(flag, dest=f.name, type=str, default=None, help=help_)

    @classmethod
    def from_args(cls: type[T], args: argparse.Namespace, base: dict[str, Any] | None = None) -> T:
        """Config from a base dict (e.g. a recipe) overridden by the flags the user gave."""
        data = dict(base or {})
        for f in dataclasses.fields(cls):
            v = getattr(args, f.name, None)
            if v is not None and f.init:
                data[f.name] = v
        return cls.from_dict(data)


def load_recipe(path: str | Path) -> list[dict[str, Any]]:
    """Read a YAML/JSON recipe: a mapping or a list of mappings, each a serialized config."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"recipe file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p} is not valid YAML/JSON: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and "stages" in data:
        data = data["stages"]
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list) or not all(isinstance(d, dict) for d in data):
        raise ConfigError(f"recipe {p} must be a mapping or a list of mappings")
    return data
