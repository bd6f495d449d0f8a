"""Perplexity through KV policies vs NLLs computed by hand from transformers' logits.

- ``evaluate_stream`` with the full cache: the last N predictions of one forward of transformers.
- With ``streaming:0:W`` (no sinks) fed one token at a time: transformers' Mistral with a sliding
  window of W + 1 (the cache keeps W keys and the query sees its own; RoPE is relative), on a stream
  longer than the tiny model's 64-position context, with the cache's bytes constant.
- ``slimlm eval --kv-policy streaming:...`` prints the same number as the function (the CLI path).
"""

from __future__ import annotations

import json
import math

import torch

from slimlm.eval.perplexity import evaluate_perplexity, evaluate_stream
from slimlm.loaders import load_model
from slimlm.models.kv_policy import KVPolicy
from tests.helpers.models import make_hf_model
from tests.helpers.tokenizers import make_tiny_tokenizer


def _tail_nll(logits: torch.Tensor, ids: list[int], last: int) -> float:
    """Mean NLL of the last ``last`` next-token predictions: logits [T, V] of tokens ids[:T]."""
    logp = logits.double().log_softmax(-1)
    n = len(ids)
    return -sum(float(logp[i, ids[i + 1]]) for i in range(n - 1 - last, n - 1)) / last


def test_stream_full_policy_equals_one_forward(tmp_path):
    hf = make_hf_model("llama", tmp_path)
    model = load_model(str(tmp_path)).model
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.no_grad():
        ref = _tail_nll(hf(torch.tensor([ids])).logits[0], ids, 25)
    for chunk in (1, 7):
        r = evaluate_stream(model, ids, KVPolicy(), score_last=25, chunk=chunk, progress=False)
        assert r.tokens_scored == 25 and abs(r.nll - ref) < 1e-5
    r = evaluate_perplexity(model, ids, seq_len=20, progress=False, kv_policy=KVPolicy.parse("int8"))
    f = evaluate_perplexity(model, ids, seq_len=20, progress=False)
    assert abs(r.nll - f.nll) < 0.01 * f.nll  # int8 KV: within 1% of the fp NLL on this tiny model


def test_stream_past_the_context_equals_sliding_window(tmp_path):
    w = 9
    hf = make_hf_model("mistral", tmp_path / "m", sliding_window=w + 1, max_position_embeddings=64)
    make_hf_model("llama", tmp_path / "a", max_position_embeddings=64)
    model = load_model(str(tmp_path / "a")).model
    model.load_state_dict(load_model(str(tmp_path / "m")).model.state_dict())
    ids = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    hf.config.max_position_embeddings = 128  # the oracle runs the whole stream in one forward
    with torch.no_grad():
        ref = _tail_nll(hf(torch.tensor([ids])).logits[0], ids, 30)
    r = evaluate_stream(model, ids, KVPolicy.parse(f"streaming:0:{w}"), score_last=30, chunk=1, progress=False)
    assert abs(r.nll - ref) < 1e-4 and r.tokens_streamed == 99
    assert r.kv_bytes == r.kv_bytes_max == 2 * 2 * 2 * w * 16 * 4  # k+v, layers, kv heads, w slots, D, fp32


def test_eval_cli_streaming_policy(tmp_path, capsys):
    from slimlm.cli.main import main

    tok = make_tiny_tokenizer(vocab_size=384)
    make_hf_model("llama", tmp_path / "m", vocab_size=384, max_position_embeddings=64)
    tok.save(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 12)
    argv = ["eval", str(tmp_path / "m"), "--data", str(text), "--kv-policy", "streaming:2:20", "--score-last", "40",
            "--stream-chunk", "4", "--json", "--no-progress"]
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out)
    ids = tok.encode(text.read_text())
    assert len(ids) > 64  # past the model's context
    r = evaluate_stream(load_model(str(tmp_path / "m")).model, ids, KVPolicy.parse("streaming:2:20"), score_last=40,
                        chunk=4, progress=False)
    assert d["kv_policy"] == "streaming:2:20" and d["tokens_scored"] == 40
    assert math.isclose(d["perplexity"], r.perplexity, rel_tol=1e-6)
