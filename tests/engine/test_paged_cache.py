"""Paged attention = contiguous attention: a ragged batch (prefill, chunked prefill, decodes mixed in
one forward) through PagedKVCache gives each sequence the logits it gets alone through the contiguous
KVCache, and transformers' logits for the same tokens."""

from __future__ import annotations

import random

import pytest
import torch

from slimlm.engine.runner import BatchEntry, ModelRunner
from slimlm.loaders import load_model
from slimlm.models.kv_cache import KVCache
from tests.helpers.models import make_hf_model


def _close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    tol = rel * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol, f"max diff {(a - b).abs().max().item():.3e} > {tol:.3e}"


def _alone(model, ids: list[int], prefill: int, first_chunk: int = 0) -> torch.Tensor:
    """Logits [len - prefill + 1, V] for the last prompt token, then each decoded token, batch 1
    (the prompt in two chunks when ``first_chunk``: dynamic NTK rotary depends on the chunking)."""
    cache = KVCache.for_model(model.config, 1, len(ids), torch.float32)
    with torch.inference_mode():
        if first_chunk:
            model(torch.tensor([ids[:first_chunk]]), cache=cache)
        out = [model(torch.tensor([ids[first_chunk:prefill]]), cache=cache)[0, -1]]
        for i in range(prefill, len(ids)):
            out.append(model(torch.tensor([[ids[i]]]), cache=cache)[0, -1])
    return torch.stack(out)


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma3", "gpt2", "llama_dynamic"])
def test_ragged_paged_batch_equals_each_sequence_alone(family, tmp_path):
    hf = make_hf_model(family, tmp_path)
    lm = load_model(str(tmp_path))
    rng = random.Random(0)
    bs, decode_steps = 4, 5
    prompts = [5, 13, 21]  # a's prompt, b's prompt, c's (prefilled in two chunks: 12 + 9)
    seqs = [[rng.randrange(256) for _ in range(p + decode_steps)] for p in prompts]
    blocks = list(range(40))
    rng.shuffle(blocks)  # scattered, non-contiguous block tables
    tables = [blocks[0:7], blocks[10:17], blocks[20:28]]
    runner = ModelRunner(lm.model, num_blocks=40, block_size=bs)

    got: list[list[torch.Tensor]] = [[], [], []]
    # step 1: a and b prefill, c's first chunk (no logits)
    lg = runner.forward([BatchEntry(tables[0], 0, seqs[0][:5]), BatchEntry(tables[1], 0, seqs[1][:13]),
                         BatchEntry(tables[2], 0, seqs[2][:12], logits=False)])
    got[0].append(lg[0])
    got[1].append(lg[1])
    # step 2: a and b decode, c's second chunk attends to its cached first chunk
    lg = runner.forward([BatchEntry(tables[0], 5, seqs[0][5:6]), BatchEntry(tables[2], 12, seqs[2][12:21]),
                         BatchEntry(tables[1], 13, seqs[1][13:14])])
    got[0].append(lg[0])
    got[2].append(lg[1])
    got[1].append(lg[2])
    # decode steps: all three in one forward (c one step behind a and b)
    for s in range(decode_steps - 1):
        entries = [BatchEntry(tables[i], prompts[i] + s + 1, seqs[i][prompts[i] + s + 1:prompts[i] + s + 2])
                   for i in (0, 1)]
        entries.append(BatchEntry(tables[2], 21 + s, seqs[2][21 + s:22 + s]))
        lg = runner.forward(entries)
        for i in range(3):
            got[i].append(lg[i])
    for i in range(3):
        n = len(got[i])
        ref = _alone(lm.model, seqs[i][:prompts[i] + n - 1], prompts[i], 12 if i == 2 else 0)
        _close(torch.stack(got[i]), ref)
    if family == "llama_dynamic":
        return  # its rotary depends on how the sequence was fed (tests/models/test_parity.py covers it)
    # and against transformers for the longest sequence (the full sequence in one causal forward)
    with torch.no_grad():
        hf_logits = hf(torch.tensor([seqs[2][:21 + len(got[2]) - 1]])).logits[0, 20:]
    _close(torch.stack(got[2]), hf_logits, 1e-4)


def test_copy_on_write_block_copy_keeps_the_parent_history(tmp_path):
    """A forked sequence continues in a copied block and sees the parent's cached keys."""
    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path))
    ids = list(range(30, 36))  # 6 tokens: block 3 full, block 5 half full
    runner = ModelRunner(lm.model, num_blocks=8, block_size=4)
    runner.forward([BatchEntry([3, 5], 0, ids)])
    # the child copies block 5 to 6 and writes its 7th token there; the parent writes into block 5
    lg = runner.forward([BatchEntry([3, 6], 6, [7]), BatchEntry([3, 5], 6, [9])], copies=[(5, 6)])
    _close(lg[0], _alone(lm.model, ids + [7], 6)[-1])
    _close(lg[1], _alone(lm.model, ids + [9], 6)[-1])


def test_batched_decode_is_one_gemm_shaped_call(tmp_path):
    """B decode streams run each linear once on [1, B, D], not B times on one row."""
    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path))
    runner = ModelRunner(lm.model, num_blocks=16, block_size=4)
    tables = [[0, 1], [4, 5], [8, 9]]
    runner.forward([BatchEntry(t, 0, [1 + i, 2, 3]) for i, t in enumerate(tables)])
    shapes = []
    down = lm.model.model.layers[0].mlp.down_proj
    h = down.register_forward_pre_hook(lambda m, a: shapes.append(tuple(a[0].shape)))
    logits = runner.forward([BatchEntry(t, 3, [7]) for t in tables])
    h.remove()
    assert shapes == [(1, 3, down.in_features)] and logits.shape == (3, lm.config.vocab_size)


def test_bf16_paged_logits_are_as_close_as_the_contiguous_cache_to_itself(tmp_path):
    """bf16: a batched paged decode differs from the batch-1 contiguous decode by no more than that
    decode differs from a full forward over the same tokens (rounding of differently shaped calls)."""
    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path), dtype=torch.bfloat16)
    rng = random.Random(0)
    a, b = [rng.randrange(256) for _ in range(18)], [rng.randrange(256) for _ in range(9)]
    runner = ModelRunner(lm.model, num_blocks=16, block_size=4)
    pre = runner.forward([BatchEntry([0, 1, 2, 3, 4], 0, a[:17]), BatchEntry([8, 9, 10], 0, b[:8])])
    dec = runner.forward([BatchEntry([0, 1, 2, 3, 4], 17, a[17:]), BatchEntry([8, 9, 10], 8, b[8:])])
    cache = KVCache.for_model(lm.config, 1, 32, torch.bfloat16)
    with torch.inference_mode():
        ref_pre = lm.model(torch.tensor([a[:17]]), cache=cache)[0, -1].float()
        ref_dec = lm.model(torch.tensor([a[17:]]), cache=cache)[0, -1].float()
        full = lm.model(torch.tensor([a]))[0, -1].float()
    ulp = 2.0 ** -8 * ref_pre.abs().max().item()  # one bf16 step at the logits' scale
    assert (pre[0] - ref_pre).abs().max().item() <= ulp
    assert (dec[0] - ref_dec).abs().max().item() <= max((ref_dec - full).abs().max().item(), ulp)
