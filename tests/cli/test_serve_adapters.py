"""``slimlm serve --adapter NAME=PATH``: a bad value is one error line naming the flag, exit 2, checked
before the model loads (the model path here does not exist, so a value that slipped through would
fail on the model instead). Serving itself: tests/server/test_lora_server.py.

Run: ``.venv/bin/python -m pytest tests/cli/test_serve_adapters.py``
"""

from __future__ import annotations

import pytest

from slimlm.cli.main import main


@pytest.mark.parametrize("values, needle", [
    (["sql"], "expected NAME=PATH"),
    (["=x"], "expected NAME=PATH"),
    (["sql="], "expected NAME=PATH"),
    (["sql={tmp}/none"], "is not an adapter folder"),
    (["sql={adapter}", "sql={adapter}"], "already served"),
    (["m={adapter}"], "already served"),  # the base model's own name
])
def test_bad_adapter_flag_is_one_line_and_exit_2(values, needle, tmp_path, capsys):  # type: ignore[no-untyped-def]
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    argv = ["serve", str(tmp_path / "no-model"), "--served-model-name", "m"]
    for v in values:
        argv += ["--adapter", v.format(tmp=tmp_path, adapter=adapter)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err and "--adapter" in lines[0] and needle in lines[0], err
