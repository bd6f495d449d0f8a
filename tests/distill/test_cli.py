"""``slimlm distill``: end to end on a tiny teacher (output loads with ``load_model``, acceptance counters
come back), and every bad input is one ``error:`` line, exit 2, nothing written.

Run: ``.venv/bin/python -m pytest tests/distill/test_cli.py``
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from slimlm.cli.main import main
from slimlm.loaders import load_model
from tests.distill.tiny import make_model
from tests.helpers.tokenizers import make_tiny_tokenizer

RECORDS = [{"prompt": "Question: what is two plus two?\nAnswer: ", "completion": "Four."},
           {"prompt": "Translate: bonjour\n", "completion": "hello"},
           {"prompt": "Name a colour: ", "completion": "Blue, like the sky at noon."}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("cli")
    teacher = make_model(d / "teacher", tokenizer=make_tiny_tokenizer(384), vocab=384)
    other = make_model(d / "other_tok", tokenizer=make_tiny_tokenizer(320), vocab=384, layers=2)
    data = d / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS * 4))
    return teacher, other, data


def test_distill_writes_a_loadable_student_and_reports_acceptance(setup, tmp_path, capsys) -> None:
    teacher, _, data = setup
    out = tmp_path / "draft"
    rc = main(["distill", str(teacher), "--student", "every-other-layer", "--layers", "2", "--data", str(data),
               "--out", str(out), "--max-steps", "2", "--seq-len", "64", "--train-dtype", "fp32", "--alpha", "0.8",
               "--temperature", "2", "--kd-loss", "rev_kl", "--acceptance-prompts", "2", "--acceptance-tokens", "4",
               "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    lm = load_model(str(out))
    assert lm.config.num_hidden_layers == 2 and res["layers"] == 2 and res["steps"] == 2
    assert lm.meta["distill"]["kd_loss"] == "rev_kl" and lm.meta["student_layers_from_teacher"] == [0, 2]
    for when in ("before", "after"):
        acc = res["acceptance"][when]
        assert acc["proposed"] > 0 and 0 <= acc["accepted"] <= acc["proposed"]
        assert acc["acceptance_rate"] == pytest.approx(acc["accepted"] / acc["proposed"])


def test_sequence_level_kd_trains_on_teacher_continuations(setup, tmp_path, capsys) -> None:
    teacher, _, data = setup
    out = tmp_path / "seqkd"
    rc = main(["distill", str(teacher), "--layers", "1", "--data", str(data), "--out", str(out), "--max-steps", "1",
               "--seq-len", "64", "--train-dtype", "fp32", "--sequence-kd-tokens", "3", "--no-progress"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "sequence-level KD: 12 teacher continuations of up to 3 tokens" in err
    assert load_model(str(out)).config.num_hidden_layers == 1


def test_on_policy_kd_regenerates_the_students_samples(setup, tmp_path, capsys) -> None:
    teacher, _, data = setup
    out = tmp_path / "gkd"
    rc = main(["distill", str(teacher), "--layers", "1", "--data", str(data), "--out", str(out), "--max-steps", "3",
               "--seq-len", "64", "--train-dtype", "fp32", "--alpha", "1", "--on-policy-every", "2",
               "--on-policy-tokens", "3", "--json"])
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["on_policy_refreshes"] == 2 and res["steps"] == 3  # before step 1, after step 2


@pytest.mark.parametrize("extra, message", [
    (["--student", "every-second-layer"], "--student every-second-layer: neither 'every-other-layer' nor a model"),
    (["--layers", "5"], "1 to 4 layers"),
    (["--student", "OTHER"], "tokenizer differs"),
    (["--alpha", "1.5"], "--alpha"),
    (["--kd-loss", "js"], "--kd-loss"),
    (["--on-policy-every", "1", "--sequence-kd-tokens", "4"], "choose one"),
    (["--acceptance-tokens", "0"], "--acceptance-tokens"),
])
def test_bad_input_is_one_line_exit_2(setup, tmp_path, capsys, extra, message) -> None:
    teacher, other, data = setup
    extra = [str(other) if a == "OTHER" else a for a in extra]
    out = tmp_path / "out"
    rc = main(["distill", str(teacher), "--data", str(data), "--out", str(out), "--max-steps", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    errors = [ln for ln in err if ln.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in "\n".join(err)
    assert not Path(out).exists()
