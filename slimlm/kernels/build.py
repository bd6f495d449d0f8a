"""Building slimlm's kernels in a child process, and loading the built library without the build machinery.

Why: ``torch.utils.cpp_extension.load`` imports setuptools/distutils, writes a ninja file and runs
ninja in the calling process on every first use, even when the library is up to date; a user's
process (and every resident-memory measurement) then carries that machinery. Here the calling
process only imports the built ``.so`` (``import_built``); when it is missing, the build runs in a
fresh ``python -m slimlm.kernels.build`` child (``build_in_child``), which uses torch's builder.

Stale locks: torch's builder guards a build folder with a plain ``lock`` file that a killed build
leaves behind, and every later build waits on it forever. The child therefore builds while holding
an ``flock`` on ``<folder>.slimlm-lock`` beside the build folder; the operating system releases it
when its holder dies, so a ``lock`` file found while holding it belongs to a dead build and is
removed (with a note on stderr).

Run ``python -m slimlm.kernels`` to build and print the status.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

CFLAGS = ["-O3", "-mavx2", "-mfma", "-ffp-contract=off", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
_PKG_ROOT = Path(__file__).resolve().parents[2]  # the folder holding this slimlm package


def build_root() -> Path:
    """torch's extension cache folder (``TORCH_EXTENSIONS_DIR``, else ``~/.cache/torch_extensions/pyXY_cpu``)."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    import torch

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cu = "cpu" if torch.version.cuda is None else f"cu{torch.version.cuda.replace('.', '')}"
    return cache / "torch_extensions" / f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_{cu}"


def library_path(name: str) -> Path:
    return build_root() / name / f"{name}.so"


@contextlib.contextmanager
def build_lock(folder: Path) -> Iterator[None]:
    """Held while building ``folder``: an flock on ``<folder>.slimlm-lock`` (released by the OS when its
    holder dies). Holding it, torch's ``folder/lock`` can only be a dead build's: removed with a note."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f"{folder.name}.slimlm-lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # waits only for a live build of the same library
        try:
            stale = folder / "lock"
            if stale.exists():
                print(f"slimlm: removing the stale build lock {stale} (left by a build that was killed)",
                      file=sys.stderr)
                stale.unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(name: str, sources: list[str], verbose: bool = False) -> Path:
    """Build (or confirm up to date) the library ``name`` from ``sources`` with torch's builder; its path."""
    from torch.utils.cpp_extension import load

    folder = build_root() / name
    with build_lock(folder):
        folder.mkdir(parents=True, exist_ok=True)
        mod = load(name, sources, extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=str(folder),
                   verbose=verbose)
    return Path(mod.__file__ or library_path(name))


def build_in_child(name: str, sources: list[str], verbose: bool = False) -> None:
    """Run :func:`build` in a fresh Python process (this process never imports the build machinery)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_PKG_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    cmd = [sys.executable, "-m", "slimlm.kernels.build", name, *sources, *(["--verbose"] if verbose else [])]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        raise RuntimeError(lines[-1] if lines else f"build exited with {out.returncode}")
    if verbose:
        sys.stderr.write(out.stderr)


def import_built(name: str) -> ModuleType | None:
    """The built library ``name`` imported as a Python module, or None if it is not built (or a build
    left its lock: then the child must check it)."""
    so = library_path(name)
    if not so.is_file() or (so.parent / "lock").exists():
        return None
    spec = importlib.util.spec_from_file_location(name, so)
    if spec is None or spec.loader is None:
        return None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str]) -> int:
    verbose = "--verbose" in argv
    args = [a for a in argv if a != "--verbose"]
    build(args[0], args[1:], verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
