"""Safe outputs: what slimlm may replace, temp-path-and-rename writes, stale temp clean-up.

Rules (every command with ``--out``/``--overwrite`` goes through here):

- Every folder slimlm writes (slimlm model directory, HF / compressed-tensors / GPTQ export) holds a
  marker file ``.slimlm-output.json``: ``{"written_by": "slimlm", "marker_version": 1, "kind": ...,
  "files": [every file slimlm wrote, relative]}``. The loader never reads it (a slimlm model
  directory is recognised by its ``slimlm.json``), so an HF export stays an HF folder.
- ``--overwrite`` replaces an existing folder only when slimlm wrote it: the marker is there and the
  folder holds nothing but the files it lists (folders from slimlm versions without a marker count
  when they hold a ``slimlm.json`` and only the files slimlm writes). Anything else is refused, with
  or without ``--overwrite``, naming what is there. An empty folder may be written into.
- A single-file output (a GGUF file) is replaced only when the caller's ``owned`` check says slimlm
  wrote it (GGUF: the metadata key ``slimlm.written_by``); any other existing file is refused.
- Writes go to a sibling ``.NAME.tmp-slimlm-PID-HEX`` (a folder carries the marker from its first
  moment), which is renamed into place; the replaced output is first renamed to
  ``.NAME.old-slimlm-PID-HEX`` and deleted after the swap. Such siblings left by a killed run are
  deleted on the next write to the same place (unless process PID still runs), with a one-line
  notice; temp siblings of older slimlm versions (no marker) are only reported.
- Before the rename every folder gets mode 0o777 and every file 0o666, less the umask, as ``mkdir``
  and ``open`` would give (``tempfile.mkdtemp``/``mkstemp`` and safetensors give 0700/0600).

Example::

    out = check_output_dir("out/model", overwrite=False)   # before the long work starts
    atomic_dir(out, lambda tmp: (tmp / "config.json").write_text("{}"), kind="hf")
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from slimlm.utils.errors import SlimlmError

MARKER = ".slimlm-output.json"
MARKER_VERSION = 1
# Names a slimlm model directory held before the marker existed (legacy outputs still count as slimlm's).
_LEGACY_MODEL_FILES = {"config.json", "model.safetensors", "slimlm.json", "tokenizer.json", "tokenizer_config.json",
                       "chat_template.jinja"}


# --- what is there -------------------------------------------------------------------------------
def _files(folder: Path) -> list[str]:
    """Every non-folder entry under ``folder``, relative, sorted (symlinks count as files)."""
    out = []
    for root, dirs, names in os.walk(folder):
        rel = Path(root).relative_to(folder)
        for d in list(dirs):
            if (Path(root) / d).is_symlink():
                names.append(d)
                dirs.remove(d)
        out += [str(rel / n) if str(rel) != "." else n for n in names]
    return sorted(out)


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a folder slimlm wrote (or is writing), or None."""
    try:
        info = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("written_by") == "slimlm" else None


def foreign_files(folder: Path) -> list[str]:
    """Files in ``folder`` slimlm did not write (all of them when it is not a slimlm output)."""
    files = [f for f in _files(folder) if f != MARKER]
    marker = read_marker(folder)
    if marker is not None and isinstance(marker.get("files"), list):
        written = {str(f) for f in marker["files"]}
        return [f for f in files if f not in written]
    if marker is None and (folder / "slimlm.json").is_file():  # a model directory from before the marker
        return [f for f in files if f not in _LEGACY_MODEL_FILES]
    return files


def _refusal(out: Path, foreign: list[str]) -> str:
    first = foreign[0]
    if len(foreign) == 1:
        what = f"{first}, which slimlm did not write"
    else:
        what = f"{first} and {len(foreign) - 1} other file{'s' if len(foreign) > 2 else ''} slimlm did not write"
    them = "it" if len(foreign) == 1 else "them"
    return f"refusing to replace {out}: it holds {what} (choose another output path, or move {them} away yourself)"


def _named(out: str | os.PathLike[str]) -> Path:
    """``Path(out)``, refusing paths without a name of their own (".", "..", "/"): no sibling to write next to."""
    p = Path(out)
    if p.name in ("", ".", ".."):
        raise SlimlmError(f"output path {str(out)!r} has no name of its own; give a file or folder name such as ./out")
    return p


def check_output_dir(out: str | os.PathLike[str], overwrite: bool) -> Path:
    """Refuse an output folder we may not write; call before long work starts. Returns ``Path(out)``."""
    out = _named(out)
    if out.is_symlink():
        raise SlimlmError(f"refusing to replace {out}: it is a symbolic link")
    if not out.exists():
        return out
    if not out.is_dir():
        raise SlimlmError(f"output path {out} exists and is not a folder")
    if not any(out.iterdir()):
        return out
    foreign = foreign_files(out)
    if foreign:
        raise SlimlmError(_refusal(out, foreign))
    if not overwrite:
        raise SlimlmError(f"output folder {out} already holds a model slimlm wrote; pass --overwrite to replace it")
    return out


def check_output_file(out: str | os.PathLike[str], overwrite: bool, owned: Callable[[Path], bool]) -> Path:
    """Refuse an output file we may not write: an existing one only if ``owned(path)`` and ``overwrite``."""
    out = _named(out)
    if out.is_symlink():
        raise SlimlmError(f"refusing to replace {out}: it is a symbolic link")
    if not out.exists():
        return out
    if not out.is_file():
        raise SlimlmError(f"output path {out} exists and is not a file")
    if not owned(out):
        raise SlimlmError(f"refusing to replace {out}: slimlm did not write it (choose another output path, or "
                          "move it away yourself)")
    if not overwrite:
        raise SlimlmError(f"{out} exists; pass --overwrite to replace it")
    return out


# --- stale siblings ------------------------------------------------------------------------------
def _sibling(out: Path, what: str) -> str:
    return f".{out.name}.{what}-slimlm-{os.getpid()}-{secrets.token_hex(4)}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def notice(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr, flush=True)


def clean_stale(out: Path, what: tuple[str, ...] = ("tmp", "old")) -> list[Path]:
    """Delete ``.NAME.{tmp,old}-slimlm-PID-HEX`` siblings of dead runs; report older slimlm temp names."""
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    ours = re.compile(rf"^\.{re.escape(out.name)}\.({'|'.join(what)})-slimlm-(\d+)-[0-9a-f]{{8}}$")
    legacy = re.compile(rf"^\.{re.escape(out.name)}\.(tmp-[a-z0-9_]{{8}}|[a-z0-9_]{{8}}\.tmp|old-[a-z0-9_]{{8}})$")
    removed, left = [], []
    for p in parent.iterdir():
        m = ours.match(p.name)
        if m is None:
            if legacy.match(p.name) and ("old" if f".{out.name}.old-" in p.name else "tmp") in what:
                left.append(p)
            continue
        if _alive(int(m.group(2))) or p.is_symlink():
            continue
        if p.is_dir():
            if read_marker(p) is None and not (m.group(1) == "old" and not foreign_files(p)):
                left.append(p)
                continue
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    if removed:
        notice(f"removed {len(removed)} leftover(s) of an interrupted slimlm run next to {out}: "
               + ", ".join(p.name for p in sorted(removed)))
    if left:
        notice(f"left {', '.join(p.name for p in sorted(left))} next to {out} alone: it looks like a temp copy from "
               "an interrupted run but carries no slimlm marker; delete it yourself if no slimlm is running")
    return removed


# --- atomic writes -------------------------------------------------------------------------------
def _write_marker(folder: Path, info: dict[str, Any]) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": "slimlm", "marker_version": MARKER_VERSION, **info},
                                            indent=2) + "\n")


def umask() -> int:
    """The process umask (read from /proc where it can be, so no thread sees it changed)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _normal_modes(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain mkdir/open would (writers such as
    safetensors create 0600 files, mkdtemp 0700 folders)."""
    mask = umask()
    paths = [root] + ([Path(r) / n for r, ds, fs in os.walk(root) for n in ds + fs] if root.is_dir() else [])
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("slimlm")
    except PackageNotFoundError:
        return "unknown"


def _new_dir(out: Path, what: str) -> Path:
    while True:
        p = out.with_name(_sibling(out, what))
        try:
            os.mkdir(p)
        except FileExistsError:
            continue
        return p


def atomic_dir(out: str | os.PathLike[str], write: Callable[[Path], None], kind: str = "") -> Path:
    """Run ``write(tmp)`` into a temp sibling folder, mark it, then swap it into place.

    ``kind`` names the output in the marker ("slimlm-model", "hf", "compressed-tensors", "gptq";
    default: "slimlm-model" when the folder holds slimlm.json, else "export"). An existing ``out`` is
    replaced only when slimlm wrote it (checked again here: minutes may have passed since
    :func:`check_output_dir`).
    """
    out = _named(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out, ("tmp", "old") if out.is_dir() else ("tmp",))  # an old copy may be all there is
    tmp = _new_dir(out, "tmp")
    try:
        _write_marker(tmp, {"state": "writing", "pid": os.getpid()})
        write(tmp)
        files = [f for f in _files(tmp) if f != MARKER]
        _write_marker(tmp, {"kind": kind or ("slimlm-model" if (tmp / "slimlm.json").is_file() else "export"),
                            "slimlm_version": _version(), "files": files})
        _normal_modes(tmp)
        if out.is_symlink() or out.exists():
            if out.is_symlink() or not out.is_dir():
                raise SlimlmError(f"refusing to replace {out}: it is not a folder")
            foreign = foreign_files(out)
            if foreign:
                raise SlimlmError(_refusal(out, foreign))
            old = out.with_name(_sibling(out, "old"))
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    clean_stale(out, ("old",))
    return out


def atomic_file(out: str | os.PathLike[str], write: Callable[[Path], None], owned: Callable[[Path], bool]) -> Path:
    """Run ``write(tmp)`` (a fresh empty file, mode 0o666 & ~umask) then rename it onto ``out``.

    An existing ``out`` is replaced only when ``owned(out)`` (slimlm wrote it); the overwrite consent
    itself is the caller's (:func:`check_output_file`).
    """
    out = _named(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    while True:
        tmp = out.with_name(_sibling(out, "tmp"))
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            continue
        break
    try:
        write(tmp)
        _normal_modes(tmp)
        if out.is_symlink() or (out.exists() and (not out.is_file() or not owned(out))):
            raise SlimlmError(f"refusing to replace {out}: slimlm did not write it")
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def write_text_atomic(path: Path, text: str) -> None:
    """Write one text file inside a folder being written (temp file + rename; mode per the umask)."""
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    atomic_file(path, write, owned=lambda p: True)
