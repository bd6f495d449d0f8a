"""KV cache policies against independent oracles.

- int8 / int4 KV: attention through the quantized cache vs torch SDPA on the fp k/v (tolerances from
  the rounding bound: int8 error <= max|x| / 254 per token; int4 <= range / 30), whole-model logits vs
  transformers' within a stated tolerance, and KV bytes counted from the tensors held against the
  format's arithmetic (int8 = (D + 2) / (2 D) of bf16).
- StreamingLLM: a stream shorter than the cache equals the plain cache (and transformers); after the
  window fills, memory stays constant; with no sinks it equals transformers' Mistral with a sliding
  window of window + 1 (relative RoPE: the same distances); with sinks, for a one-layer model (k/v of a
  token depend on that token only) each step equals transformers' fresh forward over the kept tokens
  at positions 0 .. S - 1 (what StreamingLLM's in-cache positions mean).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from slimlm.loaders import load_model
from slimlm.models.kv_cache import KVCache
from slimlm.models.kv_policy import KVPolicy, make_cache
from slimlm.models.kv_quant import Int4KVCache, Int8KVCache
from slimlm.models.kv_streaming import StreamingKVCache
from slimlm.utils.errors import ConfigError
from tests.helpers.models import make_hf_model


def _sdpa(q, k, v, mask, is_causal):  # the attention core a layer hands the cache (GQA via repeat)
    rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask, is_causal=is_causal and mask is None)


def _stream(model, cache, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits [T, V]: ``prefill`` tokens in one forward, then one token per forward."""
    with torch.inference_mode():
        out = [model(ids[:, :prefill], cache=cache)[0]]
        for i in range(prefill, ids.shape[1]):
            out.append(model(ids[:, i:i + 1], cache=cache)[0])
    return torch.cat(out)


@pytest.mark.parametrize("cls,outlier,tol", [(Int8KVCache, 1.0, 1e-2), (Int8KVCache, 8.0, 3e-2),
                                             (Int4KVCache, 8.0, 0.25)])
def test_quantized_attention_matches_sdpa_on_fp_kv(cls, outlier, tol):
    """Max error of the attention output, relative to its largest entry: int8 <= 1% on Gaussian k/v
    (3% with an 8x outlier key channel, which per-token scales must cover), KIVI int4 <= 25%."""
    torch.manual_seed(0)
    b, h, hkv, d, t0 = 2, 4, 2, 32, 40
    cache = cls(1, b, hkv, 64, d)
    q = torch.randn(b, h, t0, d)
    k, v = torch.randn(b, hkv, t0, d), torch.randn(b, hkv, t0, d)
    k[..., 3] *= outlier  # an outlier channel (what KIVI's per-channel keys are for)
    got = cache.attend(0, q, k, v, None, True, _sdpa)
    cache.advance(t0)
    ref = _sdpa(q, k, v, None, True)
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    q1, k1, v1 = torch.randn(b, h, 1, d), torch.randn(b, hkv, 1, d), torch.randn(b, hkv, 1, d)
    got = cache.attend(0, q1, k1, v1, None, False, _sdpa)  # a decode step over the stored history
    ref = _sdpa(q1, torch.cat([k, k1], 2), torch.cat([v, v1], 2), None, False)
    assert (got - ref).abs().max() <= tol * ref.abs().max()


def test_int8_rounding_bound_and_bytes_halve():
    torch.manual_seed(1)
    layers, b, hkv, t, d = 2, 1, 3, 50, 64
    cache = Int8KVCache(layers, b, hkv, t, d)
    k, v = torch.randn(b, hkv, t, d) * 5, torch.randn(b, hkv, t, d)
    seen = {}
    cache.attend(0, torch.zeros(b, hkv, t, d), k, v, None, True, lambda q, kk, vv, m, c: seen.update(k=kk, v=vv) or q)
    bound = k.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-3) + 1e-6  # half a step (+ the fp16 scale's rounding)
    assert ((seen["k"] - k).abs() <= bound).all()
    assert ((seen["v"] - v).abs() <= v.abs().amax(-1, keepdim=True) / 254 * (1 + 1e-3) + 1e-6).all()
    bf16 = KVCache(layers, b, hkv, t, d, torch.bfloat16)
    assert bf16.nbytes == layers * b * hkv * t * d * 2 * 2
    assert cache.nbytes == layers * b * hkv * t * (d + 2) * 2  # int8 codes + a float16 scale per token/head
    assert cache.nbytes / bf16.nbytes <= 0.52


def test_int4_keys_per_channel_values_per_token_residual_exact():
    torch.manual_seed(2)
    b, hkv, t, d, g = 1, 2, 45, 16, 8
    cache = Int4KVCache(1, b, hkv, 64, d, group=g)
    k, v = torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    seen = {}
    cache.attend(0, torch.zeros(b, hkv, t, d), k, v, None, True, lambda q, kk, vv, m, c: seen.update(k=kk, v=vv) or q)
    full = t - t % g  # 40 quantized, 5 residual
    assert torch.equal(seen["k"][:, :, full:], k[:, :, full:]) and torch.equal(seen["v"][:, :, full:], v[:, :, full:])
    kg = k[:, :, :full].reshape(b, hkv, full // g, g, d)  # per channel over each group of g tokens
    krange = (kg.amax(3, keepdim=True) - kg.amin(3, keepdim=True)).expand_as(kg).reshape(b, hkv, full, d)
    assert ((seen["k"][:, :, :full] - k[:, :, :full]).abs() <= krange / 30 * 1.01 + 1e-3).all()
    vq = v[:, :, :full]
    vrange = vq.amax(-1, keepdim=True) - vq.amin(-1, keepdim=True)  # per token over the head dim
    assert ((seen["v"][:, :, :full] - vq).abs() <= vrange / 30 * 1.01 + 1e-3).all()
    # 4-bit codes (two per byte) + per-group key and per-token value scale/zero, + the fixed residual
    tokens = 64
    expect = 2 * tokens * d // 2 + 2 * 2 * (tokens // g) * d + 2 * 2 * tokens + 2 * g * d * 4
    assert cache.nbytes == b * hkv * expect


@pytest.mark.parametrize("policy,rel", [("full", 1e-5), ("int8", 2e-2), ("int4:8", 0.15)])
def test_model_logits_through_policy_match_transformers(tmp_path, policy, rel):
    hf = make_hf_model("llama", tmp_path)
    model = load_model(str(tmp_path)).model
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits[0]
    got = _stream(model, make_cache(policy, model, 1, 40), ids, 24)
    assert (got - ref).abs().max() <= rel * ref.abs().max(), policy


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_streaming_shorter_than_window_equals_plain_cache(tmp_path, family):
    hf = make_hf_model(family, tmp_path)
    model = load_model(str(tmp_path)).model
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(1))
    plain = _stream(model, KVCache.for_model(model.config, 1, 30, torch.float32), ids, 12)
    got = _stream(model, make_cache("streaming:4:26", model, 1, 30), ids, 12)
    torch.testing.assert_close(got, plain, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(got, hf(ids).logits[0], rtol=1e-4, atol=1e-4)


def test_streaming_memory_constant_after_window_fills(tmp_path):
    make_hf_model("llama", tmp_path)
    model = load_model(str(tmp_path)).model
    cache = make_cache("streaming:2:10", model, 1, 0)
    assert isinstance(cache, StreamingKVCache)
    sizes, shapes = [], []
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(2))  # > the tiny context of 128
    with torch.inference_mode():
        for i in range(300):
            model(ids[:, i:i + 1], cache=cache)
            sizes.append(cache.nbytes)
            shapes.append((tuple(cache.k.shape), cache.length))
    assert len(set(sizes)) == 1 and sizes[0] == 2 * 2 * 1 * 2 * 12 * 16 * 4  # k+v, layers, B, Hkv, 12 slots, D, fp32
    assert all(s == ((2, 1, 2, 12, 16), 12) for s in shapes[11:]) and cache.seen == 300


def test_streaming_without_sinks_equals_sliding_window_attention(tmp_path):
    w = 6  # the cache keeps w keys; each query also sees its own: transformers' window of w + 1
    make_hf_model("llama", tmp_path / "a")
    hf = make_hf_model("mistral", tmp_path / "m", sliding_window=w + 1)  # same shapes, a sliding window
    model = load_model(str(tmp_path / "a")).model
    model.load_state_dict(load_model(str(tmp_path / "m")).model.state_dict())
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    got = _stream(model, make_cache(f"streaming:0:{w}", model, 1, 0), ids, 1)
    with torch.no_grad():
        ref = hf(ids).logits[0]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_streaming_sinks_keep_in_cache_positions_one_layer(tmp_path):
    sinks, w = 3, 5
    hf = make_hf_model("llama", tmp_path, num_hidden_layers=1)
    model = load_model(str(tmp_path)).model
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(4))
    got = _stream(model, make_cache(f"streaming:{sinks}:{w}", model, 1, 0), ids, 1)
    for i in range(ids.shape[1]):
        kept = list(range(i + 1)) if i < sinks + w else list(range(sinks)) + list(range(i - w, i + 1))
        with torch.no_grad():  # one layer: a token's k/v depend on itself only; positions 0 .. S - 1
            ref = hf(ids[:, kept]).logits[0, -1]
        torch.testing.assert_close(got[i], ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_window_policy_keeps_only_the_window_and_equals_transformers(tmp_path, family):
    from slimlm.models.kv_window import WindowKVCache

    hf = make_hf_model(family, tmp_path)
    model = load_model(str(tmp_path)).model
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(5))
    cache = make_cache("window", model, 1, 40)
    assert isinstance(cache, WindowKVCache)
    c = model.config
    w = c.sliding_window
    # a prefill longer than the window, a chunk, then decodes: sliding layers hold w - 1 keys, full ones 40
    with torch.inference_mode():
        got = [model(ids[:, :15], cache=cache)[0], model(ids[:, 15:22], cache=cache)[0]]
        got += [model(ids[:, i:i + 1], cache=cache)[0] for i in range(22, 40)]
    with torch.no_grad():
        torch.testing.assert_close(torch.cat(got), hf(ids).logits[0], rtol=1e-4, atol=1e-4)
    caps = [w - 1 if c.is_sliding(i) else 40 for i in range(c.num_hidden_layers)]
    assert [t.shape[2] for t in cache.k] == caps and cache.nbytes == sum(caps) * 2 * c.num_key_value_heads * c.head_dim * 4
    assert cache.nbytes < KVCache.for_model(c, 1, 40, torch.float32).nbytes


def test_policy_parse():
    assert KVPolicy.parse("full").method == "full" and str(KVPolicy.parse("INT8")) == "int8"
    assert KVPolicy.parse("window").method == "window"
    h = KVPolicy.parse("h2o:16:48")
    assert (h.heavy, h.window, h.evicts, h.bounded, str(h)) == (16, 48, True, False, "h2o:16:48")
    assert KVPolicy.parse("int4").group == 32 and KVPolicy.parse("int4:64").group == 64
    p = KVPolicy.parse("streaming:4:1020")
    assert (p.sinks, p.window, p.bounded, str(p)) == (4, 1020, True, "streaming:4:1020")
    for bad in ("int3", "streaming", "streaming:4", "streaming:a:b", "streaming:-1:5", "int8:4", "int4:1", "",
                "h2o:4", "h2o:4:0"):
        with pytest.raises(ConfigError):
            KVPolicy.parse(bad)


@pytest.mark.parametrize("argv", [
    ["eval", "x", "--kv-policy", "int3"], ["generate", "x", "--prompt", "a", "--kv-policy", "streaming:4"],
    ["serve", "x", "--kv-policy", "streaming:a:b"], ["serve", "x", "--kv-policy", "int4"],
    ["serve", "x", "--kv-policy", "streaming:4:1020"]])
def test_bad_kv_policy_flag_is_one_error_line(argv, capsys):
    from slimlm.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "kv-policy" in lines[0] or "KV policy" in lines[0], lines[0]


def test_generate_with_policies(tmp_path):
    """``generate``: the window policy gives plain greedy's tokens (same math); a streaming policy
    generates past the model's context (128) where the full cache refuses."""
    from slimlm.engine.generate import generate
    from slimlm.engine.sampling import SamplingConfig
    from slimlm.utils.errors import SlimlmError

    make_hf_model("mistral", tmp_path)
    model = load_model(str(tmp_path)).model
    prompt = [[3, 17, 40, 9, 250, 11]]
    cfg = SamplingConfig(max_new_tokens=20, ignore_eos=True)
    plain = generate(model, None, prompt, cfg)
    assert generate(model, None, prompt, cfg, kv_policy=KVPolicy.parse("window")).tokens == plain.tokens
    long = SamplingConfig(max_new_tokens=200, ignore_eos=True)
    with pytest.raises(SlimlmError):
        generate(model, None, prompt, long)
    res = generate(model, None, prompt, long, kv_policy=KVPolicy.parse("streaming:2:30"))
    assert len(res.tokens[0]) == 200
    with pytest.raises(SlimlmError, match="equal length"):
        generate(model, None, [[1, 2, 3], [4, 5]], cfg, kv_policy=KVPolicy.parse("streaming:2:30"))


def _h2o_reference(q, k, v, heavy: int, recent: int, scale: float) -> list[torch.Tensor]:
    """H2O written out per step and kv head: q [1, H, N, D], k/v [1, Hkv, N, D], one token per step.
    Each step: attend over the kept keys + the new one, add each key's softmax weight (summed over
    the kv group's query heads) to its score, then drop the lowest-scored key outside the newest
    ``recent`` when more than heavy + recent are kept."""
    _, h, n, _ = q.shape
    hkv = k.shape[1]
    g = h // hkv
    kept = [[] for _ in range(hkv)]
    score = [{} for _ in range(hkv)]
    outs = []
    for i in range(n):
        out = torch.zeros(h, q.shape[-1])
        for j in range(hkv):
            kept[j].append(i)
            score[j][i] = 0.0
            idx = torch.tensor(kept[j])
            for qh in range(j * g, (j + 1) * g):
                w = ((k[0, j, idx] @ q[0, qh, i]) * scale).softmax(0)  # [kept]
                out[qh] = w @ v[0, j, idx]
                for key, wt in zip(kept[j], w.tolist(), strict=True):
                    score[j][key] += wt
            if len(kept[j]) > heavy + recent:
                old = [key for key in kept[j] if key <= i - recent]
                kept[j].remove(min(old, key=lambda key: score[j][key]))
        outs.append(out)
    return outs


def test_h2o_equals_a_reference_written_out_per_step():
    from slimlm.models.kv_h2o import H2OKVCache

    torch.manual_seed(6)
    h, hkv, d, n, heavy, recent = 4, 2, 16, 30, 3, 4
    q, k, v = torch.randn(1, h, n, d), torch.randn(1, hkv, n, d) * 2, torch.randn(1, hkv, n, d)
    cache = H2OKVCache(1, 1, hkv, d, heavy, recent, d**-0.5)
    ref = _h2o_reference(q, k, v, heavy, recent, d**-0.5)
    for i in range(n):
        got = cache.attend(0, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], None, False, _sdpa)
        cache.advance(1)
        torch.testing.assert_close(got[0, :, 0], ref[i], rtol=1e-4, atol=1e-5)
    assert cache.held == heavy + recent and cache.k.shape[3] == heavy + recent


def test_h2o_within_capacity_equals_transformers(tmp_path):
    hf = make_hf_model("llama", tmp_path)
    model = load_model(str(tmp_path)).model
    ids = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(7))
    got = _stream(model, make_cache("h2o:10:20", model, 1, 0), ids, 12)  # prefill, then decodes
    with torch.no_grad():
        torch.testing.assert_close(got, hf(ids).logits[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="sliding"):
        make_hf_model("mistral", tmp_path / "m")
        make_cache("h2o:4:4", load_model(str(tmp_path / "m")).model, 1, 0)
