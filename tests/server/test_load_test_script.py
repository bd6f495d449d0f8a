"""`benchmarks/load_test.py --tiny` end to end: the harness that backs issue 20's load acceptance.

Its checks must be able to fail: the control inside the script walks answers against other
requests' prompts and must reject them, and the JSON it writes is read back here rather than
trusting its exit code alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_load_test_tiny_passes_with_every_check(tmp_path):
    out = tmp_path / "load.json"
    r = subprocess.run([sys.executable, "benchmarks/load_test.py", "--tiny", "--requests", "40", "--concurrency", "8",
                        "--lora", "2", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["errors"] == 0 and res["mismatched"] == 0 and res["blocks_used_at_end"] == 0
    assert res["exact"] + res["near_tie_flips"] + res["cancelled"] == 40
    assert res["cancelled"] > 0 and res["cancel_frees_blocks_s"] < 1.0
    assert res["control_swapped"] > 0 and res["control_rejected"] == res["control_swapped"]
