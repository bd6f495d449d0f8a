"""Building the kernels: the build runs in a child process, and a lock left by a killed build never hangs a load.

Run: ``.venv/bin/pytest tests/kernels/test_build.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from slimlm import kernels
from slimlm.kernels import build
from tests.helpers.kernels import require_kernels

ROOT = Path(__file__).resolve().parents[2]


def test_build_lock_removes_the_lock_of_a_dead_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "ext"
    folder.mkdir()
    (folder / "lock").touch()  # what torch's builder leaves when its process is killed mid-build
    with build.build_lock(folder):
        assert not (folder / "lock").exists()
    assert "stale build lock" in capsys.readouterr().err


def test_build_lock_waits_for_a_live_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A build in progress (its holder alive) keeps its lock: the next builder waits, removes nothing."""
    folder = tmp_path / "ext"
    folder.mkdir()
    code = ("import sys, time\nfrom pathlib import Path\nfrom slimlm.kernels.build import build_lock\n"
            "f = Path(sys.argv[1])\nwith build_lock(f):\n    (f / 'lock').touch(); print('in', flush=True)\n"
            "    time.sleep(1.5); (f / 'lock').unlink()\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "in"
        t0 = time.monotonic()
        with build.build_lock(folder):
            waited = time.monotonic() - t0
            # entered only once the live build had finished (it removes its lock, then releases the flock;
            # its process may still be exiting)
            assert not (folder / "lock").exists()
    finally:
        child.wait(timeout=30)
    assert waited > 0.5 and "stale" not in capsys.readouterr().err


def test_load_with_a_stale_lock_in_the_build_folder_does_not_hang() -> None:
    require_kernels()
    assert kernels.load() is not None
    lock = build.library_path(kernels._build_name()).parent / "lock"
    lock.touch()  # as a killed build leaves it (before: every later load waited on it forever)
    try:
        out = subprocess.run([sys.executable, "-c", "from slimlm import kernels; print(kernels.status())"], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    finally:
        lock.unlink(missing_ok=True)
    # the load returns (before: it waited on the lock forever). Whether it says "stale build lock" depends on
    # whether the load had to enter the builder at all (a clean CI clone does, a warm work tree may not)
    assert out.returncode == 0 and out.stdout.startswith("available"), out.stderr[-2000:]


def test_loading_built_kernels_imports_no_build_machinery() -> None:
    """A process that uses the (built) kernels never imports torch's builder, setuptools or distutils."""
    require_kernels()
    assert kernels.load() is not None
    code = ("import sys\nfrom slimlm import kernels\nassert kernels.load() is not None\n"
            "print(sorted(m for m in ('torch.utils.cpp_extension', 'setuptools', 'distutils') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"
