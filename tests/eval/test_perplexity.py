"""Perplexity protocol vs NLLs computed by hand from transformers' logits (tiny random llama).

Issue 17 item 5: with ``--bos`` the first text token of each window (conditioned on BOS) was not
scored. Item 3: ``stride=0`` never returned. Run: ``.venv/bin/pytest tests/eval/test_perplexity.py``.
"""

from __future__ import annotations

import math

import pytest
import torch

from slimlm.eval.perplexity import evaluate_perplexity
from slimlm.utils.errors import SlimlmError
from tests.helpers.models import make_hf_model

BOS = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from slimlm.loaders import load_model

    d = tmp_path_factory.mktemp("llama")
    hf = make_hf_model("llama", d, vocab_size=256, max_position_embeddings=128)
    return hf, load_model(str(d)).model


def reference(hf, ids: list[int], seq_len: int, stride: int | None, bos: bool) -> tuple[float, int]:
    """(mean NLL, tokens scored): the protocol written out token by token, from HF log-probs."""
    text_len = seq_len - 1 if bos else seq_len  # text tokens per window
    starts, s = [], 0
    step = text_len if stride is None or stride >= text_len else stride
    while s + text_len <= len(ids):
        starts.append(s)
        s += step
    total, n = 0.0, 0
    for k, s in enumerate(starts):
        text = ids[s : s + text_len]
        inp = ([BOS] if bos else []) + text
        with torch.no_grad():
            logp = hf(torch.tensor([inp])).logits[0].double().log_softmax(-1)  # [T, V]
        if k == 0 or step == text_len:
            scored = range(0 if bos else 1, text_len)  # with BOS, text token 0 is predicted from BOS
        else:
            scored = range(text_len - stride, text_len)  # only the tokens the previous window did not score
        for i in scored:
            p = i + (1 if bos else 0)  # window position of text token i
            total -= float(logp[p - 1, inp[p]])
            n += 1
    return total / n, n


@pytest.mark.parametrize(("seq_len", "stride", "bos"), [(16, None, False), (16, None, True), (16, 5, False),
                                                       (16, 5, True), (9, 100, True)])
def test_matches_hand_computed_nll(models, seq_len, stride, bos):
    hf, model = models
    ids = torch.randint(1, 256, (70,), generator=torch.Generator().manual_seed(1)).tolist()
    r = evaluate_perplexity(model, ids, seq_len=seq_len, stride=stride, bos_id=BOS if bos else None, progress=False)
    nll, n = reference(hf, ids, seq_len, stride, bos)
    assert r.tokens_scored == n
    assert abs(r.nll - nll) < 1e-5 and abs(r.perplexity - math.exp(nll)) / math.exp(nll) < 1e-5


def test_bos_scores_every_text_token_of_each_window(models):
    _, model = models
    ids = list(range(1, 61))  # 60 tokens; windows of BOS + 15 text tokens -> 4 windows
    r = evaluate_perplexity(model, ids, seq_len=16, bos_id=BOS, progress=False)
    assert (r.windows, r.tokens_scored) == (4, 60)  # the old code scored 4 x 14 = 56


@pytest.mark.parametrize(("kw", "needle"), [({"stride": 0}, "stride"), ({"stride": -3}, "stride"),
                                            ({"max_tokens": -5}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
                                            ({"seq_len": 1}, "seq_len")])
def test_bad_numbers_raise_instead_of_hanging_or_dropping_tokens(models, kw, needle):
    _, model = models
    with pytest.raises(SlimlmError, match=needle):
        evaluate_perplexity(model, list(range(1, 200)), **{"seq_len": 16, **kw}, progress=False)
