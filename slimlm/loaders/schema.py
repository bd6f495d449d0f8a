"""The versioned schema of ``slimlm.json`` (a slimlm model directory), checked on every load.

Format version 1::

    {
      "format_version": 1,                      # required integer; other versions are refused
      "tensor_names": "runtime",                # optional; the only naming version 1 knows
      "modules": {                              # required object: swapped linears by runtime path
        "model.layers.0.mlp.up_proj": {"kind": "int4-weight", "spec": {...}},  # kind: a registered
      },                                        #   SwappableLinear kind; spec: its create() arguments
      "dtype": "float32", "source": "...",      # optional strings
      ...                                       # anything else (recipe, report, ...) is carried along
    }

Every problem is one :class:`~slimlm.utils.errors.CheckpointError` line naming the file and the
field (``.../slimlm.json: modules['model.norm'].kind ...``), so the CLI prints it and exits 2. The
spec fields a kind needs are checked when the module is created (:func:`module_error`).
Tests: ``.venv/bin/pytest tests/loaders/test_slimlm_json.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slimlm.utils.errors import CheckpointError

SLIMLM_FORMAT_VERSION = 1


def _bad(file: Path | str, field: str, why: str) -> CheckpointError:
    return CheckpointError(f"{file}: {field} {why}")


def validate_slimlm_json(info: Any, file: Path | str) -> dict[str, Any]:
    """Check ``info`` (the parsed ``slimlm.json``) against the schema; returns it unchanged."""
    from slimlm.loaders import import_plugins
    from slimlm.models.modules import linear_kinds

    if not isinstance(info, dict):
        raise CheckpointError(f"{file} must hold a JSON object (a slimlm model description), "
                              f"not a JSON {type(info).__name__}")
    if "format_version" not in info:
        raise _bad(file, "'format_version'", "is missing")
    version = info["format_version"]
    if not isinstance(version, int) or isinstance(version, bool):
        raise _bad(file, "'format_version'", f"must be an integer, got {version!r}")
    if version != SLIMLM_FORMAT_VERSION:
        newer = " (written by a newer slimlm: upgrade slimlm)" if version > SLIMLM_FORMAT_VERSION else ""
        raise _bad(file, "'format_version'", f"is {version}; this slimlm reads format {SLIMLM_FORMAT_VERSION}{newer}")
    if info.get("tensor_names", "runtime") != "runtime":
        raise _bad(file, "'tensor_names'", f"must be \"runtime\", got {info['tensor_names']!r}")
    for key in ("dtype", "source"):
        if key in info and not isinstance(info[key], str):
            raise _bad(file, repr(key), f"must be a string, got {info[key]!r}")
    if "modules" not in info:
        raise _bad(file, "'modules'", "is missing (an object of swapped modules, {} when there are none)")
    modules = info["modules"]
    if not isinstance(modules, dict):
        raise _bad(file, "'modules'", f"must be an object of module path -> {{kind, spec}}, got {type(modules).__name__}")
    kinds = None
    for path, entry in modules.items():
        where = f"modules[{path!r}]"
        if not isinstance(entry, dict):
            raise _bad(file, where, f"must be an object with 'kind' and 'spec', got {type(entry).__name__}")
        for key in ("kind", "spec"):
            if key not in entry:
                raise _bad(file, f"{where}.{key}", "is missing")
        kind = entry["kind"]
        if not isinstance(kind, str):
            raise _bad(file, f"{where}.kind", f"must be a string, got {kind!r}")
        if kinds is None:
            import_plugins()
            kinds = linear_kinds()
        if kind not in kinds:
            raise _bad(file, f"{where}.kind", f"names unknown module kind {kind!r} (known: {', '.join(sorted(kinds))})")
        if not isinstance(entry["spec"], dict):
            raise _bad(file, f"{where}.spec", f"must be an object, got {type(entry['spec']).__name__}")
    return info


def module_error(file: Path | str, path: str, kind: str, e: Exception) -> CheckpointError:
    """The one-line error for a module whose spec its kind cannot build from (missing/bad field)."""
    where = f"modules[{path!r}].spec"
    if isinstance(e, KeyError):
        return _bad(file, where, f"lacks field {e.args[0]!r}, which kind {kind!r} needs")
    if isinstance(e, CheckpointError):  # the kind's own message names the field
        return CheckpointError(f"{file}: {where}: {e}")
    return _bad(file, where, f"cannot build a {kind!r} module: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
