"""Runtime vs transformers: logits parity for every family, prompt and incremental KV-cache decoding."""

from __future__ import annotations

import pytest
import torch

from slimlm.loaders import load_model
from slimlm.models.kv_cache import KVCache
from tests.helpers.models import TINY, make_hf_model


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    tol = 1e-4 * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol, f"max diff {(a - b).abs().max().item():.3e} > {tol:.3e}"


@pytest.mark.parametrize("family", sorted(TINY))
def test_prompt_and_incremental_decode_match_transformers(family, tmp_path):
    hf = make_hf_model(family, tmp_path)
    lm = load_model(str(tmp_path))
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (2, 20))
    with torch.no_grad():
        ref = hf(ids).logits
        out = lm.model(ids)
    _close(out, ref)
    # incremental: prefill 12 tokens, then decode 8 one at a time through the KV cache, against
    # transformers doing the same with its own cache (dynamic NTK rope depends on the step)
    cache = KVCache.for_model(lm.config, batch=2, max_len=32, dtype=torch.float32)
    with torch.no_grad():
        steps = [lm.model(ids[:, :12], cache=cache)]
        o = hf(ids[:, :12], use_cache=True)
        ref_steps, past = [o.logits], o.past_key_values
        for i in range(12, 20):
            steps.append(lm.model(ids[:, i : i + 1], cache=cache))
            o = hf(ids[:, i : i + 1], past_key_values=past, use_cache=True)
            ref_steps.append(o.logits)
            past = o.past_key_values
    _close(torch.cat(steps, dim=1), torch.cat(ref_steps, dim=1))


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
def test_left_padded_batch_matches_unpadded(family, tmp_path):
    hf = make_hf_model(family, tmp_path)
    lm = load_model(str(tmp_path))
    torch.manual_seed(2)
    a = torch.randint(0, 256, (1, 10))
    b = torch.randint(0, 256, (1, 6))
    pad = torch.zeros(1, 4, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)], 0)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :4] = 0
    with torch.no_grad():
        ref_b = hf(b).logits[0, -1]
        out = lm.model(batch, attention_mask=mask)
    _close(out[1, -1], ref_b)
    _close(out[0], hf(a).logits[0].detach())


def test_fused_projections_follow_module_swaps_and_inplace_edits(tmp_path):
    """q/k/v and gate/up run as one matmul, but edits and swaps of the separate modules still count."""
    make_hf_model("llama", tmp_path)
    lm = load_model(str(tmp_path))
    attn, mlp = lm.model.model.layers[0].self_attn, lm.model.model.layers[0].mlp
    assert attn._fusion is not None and mlp._fusion is not None
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        base = lm.model(ids)
        attn.k_proj.weight.mul_(0.5)  # in-place edit (what pruning does) reaches the fused matmul
        edited = lm.model(ids)
        assert attn._fusion is not None and not torch.allclose(base, edited)
        seen = []  # a hook (calibration capture) sees the module's own call while fusion stays on
        h = attn.k_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape))
        # same math, unfused (the fused decode GEMV may round differently in the last bits)
        torch.testing.assert_close(lm.model(ids), edited, rtol=1e-5, atol=1e-6)
        assert seen and attn._fusion is not None
        h.remove()
        new = torch.nn.Linear(attn.v_proj.in_features, attn.v_proj.out_features, bias=False)
        attn.v_proj = new  # a swap (what quantization does) switches fusion off
        swapped = lm.model(ids)
        assert attn._fusion is None
        attn_ref = lm.model.model.layers[0].self_attn
        x = torch.randn(1, 3, attn_ref.q_proj.in_features)
        assert attn_ref._fused_qkv(x) is None  # fusion stays off: each module runs its own matmul
    assert not torch.allclose(edited, swapped)
