"""``Transformer.lm_loss_sum`` (the trainer's default objective) against plain cross-entropy on full logits.

Oracle: ``F.cross_entropy(model(ids)[:, :-1], labels[:, 1:], ignore_index=-100, reduction="sum")`` on
the same model, computed by torch from the whole ``[B, T, V]`` logits. The chunked path must give the
same loss and the same gradient for every trainable parameter (a tied head included), with chunks
forced to a few rows so that several are summed, and with ignored (prompt) targets skipped.

Run: ``.venv/bin/python -m pytest tests/models/test_chunked_loss.py``
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm.loaders import load_model
from tests.helpers.models import make_hf_model


@pytest.mark.parametrize("family", ["llama_tied_rope_llama3", "gemma3", "gpt2"])
def test_chunked_loss_equals_full_logits(tmp_path, family):  # type: ignore[no-untyped-def]
    make_hf_model(family, tmp_path, vocab_size=384)
    model = load_model(str(tmp_path), dtype=torch.float32).model
    model.train()
    model.requires_grad_(True)
    torch.manual_seed(0)
    ids = torch.randint(0, 384, (2, 24))
    labels = ids.clone()
    labels[0, :7] = -100  # a prompt the loss skips
    labels[1, 20:] = -100

    ref = F.cross_entropy(model(ids)[:, :-1].reshape(-1, 384), labels[:, 1:].reshape(-1), reduction="sum")
    ref.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    # 5 rows of logits per chunk: 8 chunks over the 37 counted targets
    h_loss = model.lm_loss_sum(_hidden(model, ids), labels, chunk_bytes=5 * 4 * 384)
    h_loss.backward()
    assert torch.allclose(h_loss, ref, rtol=1e-6, atol=1e-5), (float(h_loss), float(ref))
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        err = float((p.grad - want[n]).norm() / want[n].norm().clamp_min(1e-3))  # k bias: exactly 0 in math, noise here
        assert err < 1e-5, (n, err)  # summation order only
    model.zero_grad(set_to_none=True)

    # the forward's labels= path is the same objective
    assert torch.allclose(model(ids, labels=labels), ref, rtol=1e-6, atol=1e-5)


def test_nothing_counted_is_a_zero_with_a_graph(tmp_path):  # type: ignore[no-untyped-def]
    make_hf_model("llama", tmp_path, vocab_size=384)
    model = load_model(str(tmp_path), dtype=torch.float32).model
    model.requires_grad_(True)
    ids = torch.randint(0, 384, (1, 8))
    loss = model(ids, labels=torch.full((1, 8), -100))
    loss.backward()  # no error: the loss still reaches the graph
    assert float(loss) == 0.0


def _hidden(model, ids):  # type: ignore[no-untyped-def]
    """The decoder stack's output before the final norm (what ``forward(labels=...)`` hands the loss)."""
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, a: captured.setdefault("h", a[0]))
    try:
        model(ids)
    finally:
        handle.remove()
    return captured["h"]
