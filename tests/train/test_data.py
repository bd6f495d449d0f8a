"""Training data: prompt masking, chat masking via the template, packing layout, bad input.

Oracles: hand-built token lists from the tokenizer (prompt ids then completion ids + EOS), the chat
template rendered whole (the piecewise encoding must equal encoding the full conversation), and the
file's own line numbers. Run: ``.venv/bin/python -m pytest tests/train/test_data.py``
"""

from __future__ import annotations

import json

import pytest

from slimlm.train.data import IGNORE, WindowSampler, collate, pack, read_examples
from slimlm.utils.errors import SlimlmError
from tests.helpers.tokenizers import make_tiny_tokenizer


@pytest.fixture(scope="module")
def tok():  # type: ignore[no-untyped-def]
    return make_tiny_tokenizer(384)


def _jsonl(path, rows):  # type: ignore[no-untyped-def]
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def test_prompt_completion_masks_the_prompt(tok, tmp_path):
    f = _jsonl(tmp_path / "d.jsonl", [{"prompt": "Question: 2+2?\nAnswer: ", "completion": "4"}])
    (ex,) = read_examples(f, tok, seq_len=64)
    p, c = tok.encode("Question: 2+2?\nAnswer: "), tok.encode("4") + [tok.eos_token_id]
    assert ex.ids == p + c
    assert ex.labels == [IGNORE] * len(p) + c


def test_chat_learns_only_assistant_turns(tok, tmp_path):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye"},
            {"role": "assistant", "content": "Goodbye."}]
    (ex,) = read_examples(_jsonl(tmp_path / "c.jsonl", [{"messages": msgs}]), tok, seq_len=256)
    assert ex.ids == tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False))
    # the targets, in order, are exactly the assistant replies with their end-of-turn markup
    runs, cur = [], []
    for i, lab in zip(ex.ids, ex.labels, strict=True):
        if lab == IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == i
            cur.append(i)
    runs.append(cur) if cur else None
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == ["Hello!<|im_end|>\n", "Goodbye.<|im_end|>\n"]


def test_chat_without_template_is_one_clear_line(tmp_path):
    tok = make_tiny_tokenizer(384, chat_template=None)
    f = _jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                    {"role": "assistant", "content": "b"}]}])
    for mode in ("error", "skip"):  # a property of the model: never skipped as a bad line
        with pytest.raises(SlimlmError, match="needs a chat template") as e:
            read_examples(f, tok, seq_len=64, on_bad_line=mode)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(("line", "why"), [("{not json", "not JSON"), ('{"prompt": "x"}', "both"),
                                           ('{"foo": 1}', "has: foo"), ("[1, 2]", "JSON object")])
def test_bad_line_names_file_and_line(tok, tmp_path, line, why):
    good = {"prompt": "a ", "completion": "b"}
    f = _jsonl(tmp_path / "d.jsonl", [good, line, good])
    with pytest.raises(SlimlmError) as e:
        read_examples(f, tok, seq_len=64)
    msg = str(e.value)
    assert msg.startswith(f"{f}:2: ") and why in msg and "\n" not in msg
    from slimlm.train.data import DataStats

    stats = DataStats()
    assert len(read_examples(f, tok, seq_len=64, on_bad_line="skip", stats=stats)) == 2
    assert stats.skipped_lines == 1


def test_missing_file_and_unknown_builtin(tok):
    with pytest.raises(SlimlmError, match="data file not found"):
        read_examples("/no/such.jsonl", tok, 64)
    with pytest.raises(SlimlmError, match="builtin:instruct"):
        read_examples("builtin:nope", tok, 64)


def test_builtin_instruct_ships_tens_of_examples(tok):
    ex = read_examples("builtin:instruct", tok, seq_len=512)
    assert 20 <= len(ex) <= 200
    assert all(lab == IGNORE for lab in ex[0].labels[:3]) and any(lab != IGNORE for lab in ex[0].labels)


def test_plain_text_windows_every_token_a_target(tok, tmp_path):
    (tmp_path / "t.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    ex = read_examples(str(tmp_path / "t.txt"), tok, seq_len=16)
    ids = tok.encode((tmp_path / "t.txt").read_text())
    assert [i for e in ex for i in e.ids] == ids[: sum(len(e.ids) for e in ex)]
    assert all(len(e.ids) == 16 for e in ex[:-1]) and all(e.labels == e.ids for e in ex)


def test_pack_segments_positions_and_first_token(tok):
    from slimlm.train.data import Example

    a, b, c = Example([1, 2, 3], [IGNORE, 2, 3]), Example([4, 5], [4, 5]), Example([6, 7, 8, 9], [6, 7, 8, 9])
    w = pack([a, b, c], seq_len=6)
    assert [x.ids for x in w] == [[1, 2, 3, 4, 5], [6, 7, 8, 9]]  # c does not fit: a new window, never split
    assert w[0].positions == [0, 1, 2, 0, 1] and w[0].segments == [0, 0, 0, 1, 1]
    assert w[0].labels == [IGNORE, 2, 3, IGNORE, 5]  # b's first token is not predicted from a
    batch = collate(w, pad_id=0)
    assert batch["input_ids"].shape == (2, 5) and batch["segment_ids"][1].tolist() == [0, 0, 0, 0, -1]
    assert batch["labels"][1, -1] == IGNORE and bool(batch["packed"])
    assert [x.ids for x in pack([a, b], 6, packing=False)] == [[1, 2, 3], [4, 5]]


def test_sampler_order_is_a_function_of_seed_epoch_and_position():
    from slimlm.train.data import Window

    ws = [Window(ids=[i, i]) for i in range(5)]
    s1 = WindowSampler(ws, 2, seed=3)
    seen = [w.ids[0] for _ in range(4) for w in s1.next_batch()]
    assert sorted(seen[:5]) == list(range(5))  # one epoch is a permutation
    s2 = WindowSampler(ws, 2, seed=3)
    s2.next_batch()
    state = s2.state_dict()
    s3 = WindowSampler(ws, 2, seed=3)
    s3.load_state_dict(state)
    assert [w.ids[0] for _ in range(3) for w in s3.next_batch()] == seen[2:]
