"""Bench results files: the versioned schema (``results.schema.json``, JSON Schema 2020-12), checks,
reading, and appending a run without losing what the file held.

A results file is ``{"schema": "slimlm-bench-results", "schema_version": 1, "runs": [...]}``; every
``slimlm bench`` appends one run. Reading checks the file against the schema and names the file
and the first problem in one line (:class:`~slimlm.utils.errors.SlimlmError`). Writing goes to a
temporary sibling that is renamed over the file, and only over a file of this schema.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from slimlm.utils.errors import SlimlmError

SCHEMA_NAME = "slimlm-bench-results"
SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("results.schema.json")


@functools.cache
def schema() -> dict[str, Any]:
    """The JSON Schema document of :data:`SCHEMA_VERSION`."""
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))


def validation_errors(obj: Any) -> list[str]:
    """Every schema violation of ``obj`` as ``path: message`` (empty when valid)."""
    import jsonschema

    v = jsonschema.Draft202012Validator(schema())
    out = []
    for e in sorted(v.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        out.append(f"{where}: {e.message[:200]}")
    return out


def check_results(obj: Any, where: str) -> None:
    """Raise one line naming ``where`` when ``obj`` is not a results object of this schema version."""
    if not isinstance(obj, dict) or obj.get("schema") != SCHEMA_NAME:
        raise SlimlmError(f"{where}: not a slimlm bench results file (no \"schema\": \"{SCHEMA_NAME}\")")
    ver = obj.get("schema_version")
    if ver != SCHEMA_VERSION:
        raise SlimlmError(f"{where}: schema_version {ver!r} is not supported (this slimlm reads version "
                          f"{SCHEMA_VERSION})")
    errs = validation_errors(obj)
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise SlimlmError(f"{where}: does not match the results schema: {errs[0]}{more}")
    labels = [[v["label"] for v in r["variants"]] for r in obj["runs"]]
    for r, ls in zip(obj["runs"], labels, strict=True):
        if len(set(ls)) != len(ls):
            raise SlimlmError(f"{where}: run {r['run_id']} has two variants with one label")
        if r["base"] not in ls:
            raise SlimlmError(f"{where}: run {r['run_id']}: base {r['base']!r} is none of its variants")


def read_results(path: str | Path) -> dict[str, Any]:
    """Read and check a results file; one error line naming the file when it is missing, corrupt or
    of another schema version."""
    p = Path(path)
    if not p.is_file():
        raise SlimlmError(f"{p}: no such results file")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise SlimlmError(f"{p}: not a text file (corrupt results file)") from None
    except json.JSONDecodeError as e:
        raise SlimlmError(f"{p}: corrupt results file (invalid JSON at line {e.lineno} column {e.colno}: {e.msg})") from None
    check_results(obj, str(p))
    return obj


def empty_results() -> dict[str, Any]:
    return {"schema": SCHEMA_NAME, "schema_version": SCHEMA_VERSION, "runs": []}


def check_writable(path: str | Path) -> dict[str, Any]:
    """The results already at ``path`` (checked), or an empty file's object; fails before any work
    when ``path`` holds something else, so a bench run never ends on a file it may not replace."""
    p = Path(path)
    if p.is_dir():
        raise SlimlmError(f"{p}: is a folder; --out names a results file")
    if p.exists():
        return read_results(p)
    if not p.parent.exists():
        raise SlimlmError(f"{p.parent}: no such folder for the results file")
    return empty_results()


def append_run(path: str | Path, run: dict[str, Any]) -> dict[str, Any]:
    """Append ``run`` to the results at ``path`` (created when absent); returns the whole object."""
    p = Path(path)
    obj = check_writable(p)
    obj["runs"].append(run)
    check_results(obj, f"{p} (new run)")  # never write a file the reader would refuse
    write_json(obj, p)
    return obj


def write_json(obj: Any, path: Path) -> None:
    write_text(json.dumps(obj, indent=1) + "\n", path)


def write_text(text: str, path: Path) -> None:
    """Write ``text`` to a temporary sibling (mode per the umask), then rename it over ``path``."""
    from slimlm.loaders.outputs import umask

    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp gives 0600; an output gets the usual mode for the umask
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
