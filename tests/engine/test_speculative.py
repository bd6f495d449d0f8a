"""Speculative decoding on tiny random models: lossless against independent oracles.

- greedy: every method (a draft model = the target's copy, so drafts are accepted; an unrelated draft,
  so they are rejected; self layer-skip; n-gram lookup) gives the tokens of plain greedy decoding
  (slimlm's contiguous-cache ``generate``) on a batch of different-length requests;
- sampled: the distribution of a position produced by verification matches the target's exact
  probabilities (transformers' logits), chi-square, for a draft model and for n-gram point masses;
- the block pools are empty at the end; rejected drafts' blocks are freed; gamma gating switches
  speculation off when drafts are rejected.
"""

from __future__ import annotations

import random

import pytest
import torch

from slimlm.engine.generate import generate
from slimlm.engine.llm import LLM
from slimlm.engine.sampling import SamplingConfig
from slimlm.engine.scheduler import SchedulerConfig
from slimlm.engine.sequence import Sequence
from slimlm.engine.spec import SpecConfig, Speculator, _SeqSpec, expected_tokens
from slimlm.engine.spec.proposers import NgramProposer
from slimlm.engine.spec.rejection import verify_sampled
from slimlm.loaders import load_model
from tests.helpers.models import make_hf_model

CFG = SchedulerConfig(num_blocks=128, block_size=4, max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    a, b = tmp_path_factory.mktemp("target"), tmp_path_factory.mktemp("draft")
    hf = make_hf_model("llama", a, seed=0, num_hidden_layers=3)
    make_hf_model("llama", b, seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    return hf, load_model(str(a)), load_model(str(b))


def _prompts():
    rng = random.Random(0)
    motif = [rng.randrange(256) for _ in range(6)]
    return [[rng.randrange(256) for _ in range(n)] for n in (3, 11, 20)] + [motif * 4, motif * 2 + [1, 2]]


@pytest.mark.parametrize("method", ["copy", "other", "self", "ngram"])
def test_speculative_greedy_equals_plain_greedy(models, method):
    _, lm, small = models
    spec = SpecConfig(spec="ngram" if method == "ngram" else "self" if method == "self" else "off",
                      num_speculative_tokens=3, spec_adaptive=False)
    draft = {"copy": lm, "other": small}.get(method)
    llm = LLM(lm, CFG, spec=spec, draft=draft)
    prompts = _prompts()
    params = [SamplingConfig(max_new_tokens=n, ignore_eos=True) for n in (14, 9, 17, 20, 6)]
    outs = llm.generate(prompts, params)
    for p, pr, o in zip(prompts, params, outs, strict=True):
        assert o.token_ids == generate(lm.model, None, [p], pr).tokens[0]
    st = llm.engine.stats
    assert st["spec_proposed"] > 0
    if method == "copy":  # the draft is the target: everything is accepted
        assert st["spec_acceptance_rate"] == 1.0 and st["spec_tokens_per_step"] > 3
    assert llm.engine.scheduler.kv.pool.num_free == llm.engine.scheduler.kv.pool.num_blocks
    prop = llm.engine.spec.proposer
    if hasattr(prop, "kv"):
        assert prop.kv.pool.num_free == prop.kv.pool.num_blocks and not prop.kv.tables


def test_self_speculation_keeping_every_layer_is_always_accepted(models):
    """With every layer kept, the self draft is the target itself: a draft that its own KV or layer
    bookkeeping got wrong would be rejected somewhere."""
    _, lm, _ = models
    llm = LLM(lm, CFG, spec=SpecConfig(spec="self", self_keep_layers=1.0, num_speculative_tokens=3,
                                       spec_adaptive=False))
    outs = llm.generate(_prompts()[:3], SamplingConfig(max_new_tokens=12, ignore_eos=True))
    assert [o.token_ids for o in outs] == [generate(lm.model, None, [p], SamplingConfig(
        max_new_tokens=12, ignore_eos=True)).tokens[0] for p in _prompts()[:3]]
    st = llm.engine.stats
    assert st["spec_proposed"] > 0 and st["spec_acceptance_rate"] == 1.0


def test_rejected_drafts_blocks_are_freed(models):
    _, lm, small = models
    llm = LLM(lm, SchedulerConfig(num_blocks=64, block_size=2), spec=SpecConfig(num_speculative_tokens=6,
                                                                                   spec_adaptive=False), draft=small)
    eng = llm.engine
    eng.add_request([5, 6, 7], SamplingConfig(max_new_tokens=30, ignore_eos=True))
    checked = 0
    while eng.has_unfinished():
        eng.step()
        for seq in eng.scheduler.running:  # table covers the computed tokens only (+ the partial block)
            assert len(eng.scheduler.kv.tables[seq.seq_id]) == eng.scheduler.kv.blocks_for(seq.num_computed)
            eng.scheduler.kv.check()
            checked += 1
    assert checked > 0 and eng.stats["spec_accepted"] < eng.stats["spec_proposed"]
    assert eng.scheduler.kv.pool.num_free == eng.scheduler.kv.pool.num_blocks


def test_gamma_gating_turns_speculation_off_when_drafts_are_rejected(models):
    _, lm, small = models
    llm = LLM(lm, CFG, spec=SpecConfig(num_speculative_tokens=4, probe_interval=1000), draft=small)
    outs = llm.generate([[1, 2, 3], [9, 8]], SamplingConfig(max_new_tokens=40, ignore_eos=True))
    st = llm.engine.stats
    assert st["spec_off_requests"] == 2
    # a few early proposals, then none: far fewer than gamma per step
    assert st["spec_proposed"] < 0.25 * 4 * sum(len(o.token_ids) for o in outs)
    # the same rule with a cheap, well-predicting proposer keeps gamma up: alpha 0.9, draft cost 5%
    spec = llm.engine.spec
    seq = Sequence(99, [1, 2, 3], SamplingConfig(max_new_tokens=100))
    seq.state["spec"] = _SeqSpec(success=9.0, trials=10.0)
    spec.cost.draft_ratio = 0.05
    assert spec.gamma(seq, batch=1) >= 3
    seq.state["spec"] = _SeqSpec(success=0.5, trials=10.0)
    assert spec.gamma(seq, batch=1) == 0
    # expected tokens per verify step (the closed form the rule uses) against a direct sum
    assert abs(expected_tokens(0.6, 4) - sum(0.6 ** i for i in range(5))) < 1e-12


def test_cost_fit_from_a_single_stream_turns_low_acceptance_off():
    """One stream's steps are mostly 1 token with a 2-token verify now and then (variance < 0.25):
    the fit must still see that a verify token costs 0.3 of a step, so alpha 0.16 (E = 1.16 tokens
    for 1.3 steps' cost) does not pay while alpha 0.6 does."""
    spec = Speculator(SpecConfig(spec="ngram"), NgramProposer())
    for i in range(40):
        n = 2 if i % 6 == 0 else 1
        spec.observe_step(n, 1, 0.010 + 0.003 * n)  # a = 10 ms, b = 3 ms: v(1) = 3 / 13
    assert abs(spec.cost.v(1) - 3 / 13) < 1e-6
    seq = Sequence(7, [1, 2, 3], SamplingConfig(max_new_tokens=50))
    seq.state["spec"] = _SeqSpec(success=1.6, trials=10.0)
    assert spec.gamma(seq, batch=1) == 0
    seq.state["spec"] = _SeqSpec(success=6.0, trials=10.0)
    assert spec.gamma(seq, batch=1) >= 1
    # a new request starts from the engine's recent acceptance: after verifies that all failed it
    # does not speculate at all (a fixed prior of 0.5 would make it pay g = 1 first)
    for _ in range(30):
        spec.verify(Sequence(8, [1, 2], SamplingConfig(max_new_tokens=5)), torch.eye(4)[[0, 0]] * 5.0, [3])
    assert spec.recent.alpha < 0.1
    assert spec.gamma(Sequence(9, [1, 2, 3], SamplingConfig(max_new_tokens=50)), batch=1) == 0
    # re-probes of a request whose probes keep failing back off: after 16, then 32, 64 more steps
    seq = Sequence(10, [1, 2, 3], SamplingConfig(max_new_tokens=1000))
    seq.state["spec"] = _SeqSpec(success=0.0, trials=10.0)
    probes = [i for i in range(1, 201) if spec.gamma(seq, batch=1) == 1]
    assert probes == [16, 48, 112]


def _chi2_ok(counts: torch.Tensor, p: torch.Tensor) -> float:
    """Pearson chi-square statistic over cells with expected count >= 5 (the rest pooled)."""
    n = counts.sum()
    exp = p * n
    big = exp >= 5
    obs = torch.cat([counts[big], counts[~big].sum().view(1)])
    e = torch.cat([exp[big], exp[~big].sum().view(1)])
    keep = e > 0
    return float(((obs[keep] - e[keep]) ** 2 / e[keep]).sum()), int(keep.sum()) - 1


def test_rejection_sampling_follows_the_target_distribution():
    """The verification rule alone, exact distributions over 6 tokens: token 0 (draft) and token 1."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.05, 0.4, 0.1, 0.2, 0.15, 0.1], [0.3, 0.1, 0.1, 0.2, 0.2, 0.1]])
    q = torch.tensor([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]])
    n = 20000
    first = torch.zeros(6)
    for _ in range(n):
        d = int(torch.multinomial(q[0], 1, generator=g))
        first[verify_sampled(p, [d], q, g)[0]] += 1
    stat, df = _chi2_ok(first, p[0])
    assert stat < 25.0  # df = 5: p-value ~ 1e-4
    naive = torch.zeros(6)  # power: the draft's own distribution is rejected by the same test
    naive += q[0] * n
    assert _chi2_ok(naive, p[0])[0] > 1000
    point = torch.zeros(6)  # n-gram style point mass on token 3
    for _ in range(n):
        point[verify_sampled(p, [3], None, g)[0]] += 1
    assert _chi2_ok(point, p[0])[0] < 25.0


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_sampled_speculation_follows_the_target_distribution(models, method):
    """(x1, x2) of many seeded requests, x2 being the first token verification produces, against the
    target's exact p(x1 | prompt) p(x2 | prompt, x1) (transformers' logits, top-k 4, T = 0.7).
    n-gram (1-grams only): a proposal is made exactly when x1 occurs in the prompt, so the test
    conditions on that event (x1 in the prompt: the token after its last occurrence is proposed)."""
    hf, lm, small = models
    rng = random.Random(3)
    prompt = rng.sample(range(256), 100) if method == "ngram" else [10, 20, 30]
    params = dict(temperature=0.7, top_k=4, max_new_tokens=3, ignore_eos=True)
    n = 320
    llm = LLM(lm, SchedulerConfig(num_blocks=1024, block_size=16, max_num_seqs=n, max_num_batched_tokens=4096),
              spec=SpecConfig(spec="ngram" if method == "ngram" else "off", num_speculative_tokens=1,
                              spec_adaptive=False, ngram_min=1, ngram_max=1), draft=small if method == "draft" else None)
    llm.generate([prompt], SamplingConfig(max_new_tokens=1))  # the prompt's KV goes to the prefix cache
    outs = llm.generate([prompt] * n, [SamplingConfig(seed=s, **params) for s in range(n)])

    def dist(ids):  # processed target distribution of the next token, from transformers
        with torch.no_grad():
            logits = hf(torch.tensor(ids)).logits[:, -1].float() / 0.7
        kth = logits.topk(4).values[:, -1:]
        return logits.masked_fill(logits < kth, float("-inf")).softmax(-1)

    p1 = dist([prompt])[0]
    x1s = [x for x in p1.nonzero().flatten().tolist() if method == "draft" or x in prompt]
    assert x1s, "no first token the n-gram lookup can continue: pick another prompt seed"
    p2 = dist([prompt + [x] for x in x1s])  # [len(x1s), V]
    joint = (p1[x1s].unsqueeze(1) * p2).flatten()
    joint = joint / joint.sum()
    counts = torch.zeros(len(x1s), 256)
    kept = [o for o in outs if o.token_ids[0] in x1s]
    for o in kept:
        counts[x1s.index(o.token_ids[0]), o.token_ids[1]] += 1
    assert llm.engine.stats["spec_verify_steps"] == len(kept) > n // 8
    stat, df = _chi2_ok(counts.flatten(), joint)
    assert df >= 3 and stat < 45.0  # chi-square with <= 16 df: p-value < 2e-4 above this
    # power: the proposal distribution itself is far from the target's (a sampler returning drafts fails)
    if method == "draft":
        with torch.no_grad():
            q = small.model(torch.tensor([prompt])).float()[0, -1] / 0.7
        q = q.masked_fill(q < q.topk(4).values[-1], float("-inf")).softmax(-1)
        assert _chi2_ok(q * len(kept), p1)[0] > 100
