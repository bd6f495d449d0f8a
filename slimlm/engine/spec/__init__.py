"""Speculative decoding inside continuous batching: propose, verify in the target's batched step, roll back.

How a step runs (``LLMEngine.step``): :meth:`Speculator.propose` gives each running decode a draft of
``gamma`` tokens (``Sequence.draft``); the scheduler appends it to the decode's one token when the
token budget and free blocks allow, so the target scores ``1 + gamma`` positions of that sequence in
the same ragged forward as every other request (a short chunk with a causal mask); the engine then
verifies (:mod:`slimlm.engine.spec.rejection`), the scheduler appends the 1 .. gamma + 1 tokens and
frees the blocks that only held rejected drafts (``KVCacheManager.truncate``).

gamma per request (``adaptive``): with the request's measured acceptance rate ``alpha`` (decayed
counts) a verify step yields ``E(g) = (1 - alpha**(g+1)) / (1 - alpha)`` tokens and costs
``1 + g * (c + v)`` plain steps, where ``c`` is the measured draft cost per proposed token relative to
the target's per-sequence step cost, and ``v`` the target's marginal cost of one more token in a step
(from a least-squares fit of measured forward time against tokens per step; on CPU a decode step is
bound by weight reads, so ``v`` is small for few streams and grows with the batch). A request
starts from the engine's recent acceptance rate (every verify, decayed), not a fixed prior, so on
a workload whose drafts fail new requests do not pay to find out. The ``g`` that maximises ``E(g) / cost(g)`` is used; when no ``g >= 1`` beats plain decoding the request stops
speculating and re-probes with ``g = 1`` after ``probe_interval`` steps, twice as long after each
probe in vain (up to 16x).

Not speculated (decoded plainly): requests with a repetition penalty or a structured-output
constraint (their next-token processing depends on the tokens before it).

Example::

    llm = LLM("smollm2-135m", spec=SpecConfig(method="ngram"))
    llm.generate(["Repeat: the cat sat on the mat. the cat"], SamplingConfig(max_new_tokens=16))
    llm.engine.stats["spec_acceptance_rate"], llm.engine.stats["spec_tokens_per_step"]
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from slimlm.engine.sampling import probs
from slimlm.engine.sequence import Sequence
from slimlm.engine.spec.proposers import LayerSubset, ModelProposer, NgramProposer, self_draft_layers
from slimlm.engine.spec.rejection import verify_greedy, verify_sampled
from slimlm.utils.config import BaseConfig, register_config
from slimlm.utils.errors import ConfigError, SlimlmError


@register_config
@dataclass
class SpecConfig(BaseConfig):
    kind: ClassVar[str] = "speculative"
    spec: Literal["off", "draft", "ngram", "self"] = field(
        default="off", metadata={"help": "speculative decoding: a draft model (--draft), n-gram prompt lookup, or "
                                         "the target with layers skipped"})
    draft: str = field(default="", metadata={"help": "draft model with the target's tokenizer (implies --spec draft)"})
    num_speculative_tokens: int = field(default=4, metadata={"min": 1, "max": 16, "help": "largest gamma"})
    spec_adaptive: bool = field(default=True, metadata={
        "help": "adapt gamma to the measured acceptance rate and cost ratio; off per request when it would not pay"})
    self_keep_layers: float = field(default=0.5, metadata={"gt": 0, "max": 1,
                                                           "help": "fraction of layers the self-speculation draft keeps"})
    ngram_max: int = field(default=3, metadata={"min": 1, "help": "longest n-gram matched by prompt lookup"})
    ngram_min: int = field(default=1, metadata={"min": 1, "help": "shortest n-gram matched by prompt lookup"})
    probe_interval: int = field(default=16, metadata={"min": 1, "help": "steps between re-probes of a request "
                                                                        "whose speculation is off"})

    def validate(self) -> None:
        if self.draft and self.spec not in ("off", "draft"):
            raise ConfigError(f"--draft names a draft model; it cannot be combined with --spec {self.spec}")
        if self.ngram_min > self.ngram_max:
            raise ConfigError("ngram_min must be <= ngram_max")

    @property
    def method(self) -> str:
        return "draft" if self.draft else self.spec

    @property
    def enabled(self) -> bool:
        return self.method != "off"


@dataclass
class _SeqSpec:
    """Acceptance statistics (decayed counts) of a request, or of the engine's recent verifies (a new
    request's prior: their alpha with weight 2; 0.5 before any)."""

    success: float = 1.0
    trials: float = 2.0
    off_steps: int = 0
    probes: int = 0  # re-probes since speculation last paid
    next_probe: int = 0  # off_steps at which the next re-probe runs

    @property
    def alpha(self) -> float:
        return self.success / self.trials


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens a verify step yields with i.i.d. acceptance ``alpha`` and ``gamma`` drafts."""
    if alpha >= 1.0:
        return gamma + 1.0
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


class _CostModel:
    """Measured step costs: target forward time ~ a + b * tokens (least squares over recent steps),
    and the draft's time per proposed token and sequence."""

    # v before any fit: SmolLM2's Q4_1 GGUF at batch 1 (AMD EPYC AVX2) ran 2 tokens in 1.28x one's time
    def __init__(self, window: int = 64, v_prior: float = 0.25):
        self.obs: collections.deque[tuple[int, float]] = collections.deque(maxlen=window)
        self.draft_ratio: float | None = None  # EMA of c
        self.v_prior = v_prior
        self._fit: tuple[float, float] | None = None
        self._stale = True

    def observe_target(self, n_tokens: int, seconds: float) -> None:
        self.obs.append((n_tokens, seconds))
        self._stale = True  # refit on the next question

    def fit(self) -> tuple[float, float] | None:
        """``(a, b)`` once the window holds 8 steps, 3 or more of them with another token count than
        the commonest (a single stream mostly alternates 1 and 2 tokens: its variance is below 0.25).
        Computed once per observed step (every running sequence's gamma asks)."""
        if self._stale:
            self._fit, self._stale = self._least_squares(), False
        return self._fit

    def _least_squares(self) -> tuple[float, float] | None:
        ns = [o[0] for o in self.obs]
        if len(ns) < 8:
            return None
        mode = max(set(ns), key=ns.count)
        if sum(k != mode for k in ns) < 3:
            return None
        ts = [o[1] for o in self.obs]
        n_mean, t_mean = sum(ns) / len(ns), sum(ts) / len(ts)
        b = sum((n - n_mean) * (t - t_mean) for n, t in zip(ns, ts, strict=True)) / sum((n - n_mean) ** 2 for n in ns)
        b = max(b, 0.0)
        a = max(t_mean - b * n_mean, 1e-9)
        return a, b

    def v(self, batch: int) -> float:
        """Extra cost of one more token in a step, relative to one sequence's share of a plain step."""
        ab = self.fit()
        if ab is None:
            return self.v_prior
        a, b = ab
        return b * batch / (a + b * batch)

    def observe_draft(self, draft_seconds_per_seq_token: float, target_seconds_per_seq: float) -> None:
        if target_seconds_per_seq <= 0:
            return
        r = draft_seconds_per_seq_token / target_seconds_per_seq
        self.draft_ratio = r if self.draft_ratio is None else 0.8 * self.draft_ratio + 0.2 * r


class Speculator:
    """Proposer + gamma control + verification + statistics for one engine."""

    def __init__(self, cfg: SpecConfig, proposer: Any):
        self.cfg, self.proposer = cfg, proposer
        self.cost = _CostModel()
        self.stats = {"spec_proposed": 0, "spec_accepted": 0, "spec_verify_steps": 0, "spec_emitted": 0,
                      "spec_off_requests": 0}
        self._last_target_per_seq = 0.0
        # every verify's outcome, decayed over ~50 verifies: a new request's prior alpha (weight 2),
        # so on a workload where drafts keep failing (open chat) requests start with speculation off
        self.recent = _SeqSpec(success=1.0, trials=2.0)

    # --- gamma ----------------------------------------------------------------------------------
    def eligible(self, seq: Sequence) -> bool:
        return seq.constraint is None and "seen" not in seq.state

    def gamma(self, seq: Sequence, batch: int) -> int:
        """Drafts to propose for ``seq`` this step (0 = decode plainly)."""
        cap = min(self.cfg.num_speculative_tokens, seq.params.max_new_tokens - seq.num_output - 1)
        if seq.max_len is not None:
            cap = min(cap, seq.max_len - seq.num_tokens)
        if cap < 1:
            return 0
        if not self.cfg.spec_adaptive:
            return cap
        st: _SeqSpec = seq.state.get("spec") or seq.state.setdefault("spec", _SeqSpec(2.0 * self.recent.alpha, 2.0))
        c = self.cost.draft_ratio if self.cost.draft_ratio is not None else (0.0 if self.cfg.method == "ngram" else 0.3)
        per_token = c + self.cost.v(batch)
        best_g, best = 0, 1.0
        for g in range(1, cap + 1):
            gain = expected_tokens(st.alpha, g) / (1.0 + g * per_token)
            if gain > best:
                best_g, best = g, gain
        if best_g == 0:
            if st.off_steps == 0:
                self.stats["spec_off_requests"] += 1
                st.next_probe = self.cfg.probe_interval
            st.off_steps += 1
            if st.off_steps >= st.next_probe:
                st.probes += 1  # each probe in vain doubles the wait (up to 16x)
                st.next_probe = st.off_steps + (self.cfg.probe_interval << min(st.probes, 4))
                return 1  # re-probe: the text may have become predictable
        else:
            st.off_steps, st.probes = 0, 0
        return best_g

    def propose(self, running: list[Sequence]) -> None:
        """Set ``seq.draft`` for the running decodes that speculate this step."""
        for s in running:
            s.draft = []
        decodes = [s for s in running if s.num_computed == s.num_tokens - 1 and self.eligible(s)]
        items = [(s, g) for s in decodes if (g := self.gamma(s, len(running))) > 0]
        if not items:
            return
        got = self.proposer.propose(items)
        for seq, _ in items:
            p = got.get(seq.seq_id)
            if p:
                seq.draft = p[0]
                seq.state["spec_q"] = p[1]
        if isinstance(self.proposer, ModelProposer) and got and self._last_target_per_seq > 0:
            per = self.proposer.last_seconds / max(1, len(items)) / max(1, self.proposer.last_rounds)
            self.cost.observe_draft(per, self._last_target_per_seq)

    # --- after the target's forward ----------------------------------------------------------------
    def observe_step(self, n_tokens: int, n_seqs: int, seconds: float) -> None:
        self.cost.observe_target(n_tokens, seconds)
        if n_seqs:
            self._last_target_per_seq = seconds / n_seqs

    def verify(self, seq: Sequence, logits: torch.Tensor, draft: list[int]) -> list[int]:
        """logits: [1 + len(draft), V] of the target -> the tokens to append (1 .. len(draft) + 1)."""
        q = seq.state.pop("spec_q", None)
        if seq.params.greedy:
            out = verify_greedy(logits, draft)
        else:
            out = verify_sampled(probs(logits, seq.params), draft, q, seq.state.get("gen"))
        k = len(out) - 1  # accepted drafts
        st: _SeqSpec = seq.state.setdefault("spec", _SeqSpec())
        st.success = 0.9 * st.success + k
        st.trials = 0.9 * st.trials + k + (k < len(draft))
        self.recent.success = 0.98 * self.recent.success + k
        self.recent.trials = 0.98 * self.recent.trials + k + (k < len(draft))
        self.stats["spec_proposed"] += len(draft)
        self.stats["spec_accepted"] += k
        self.stats["spec_verify_steps"] += 1
        self.stats["spec_emitted"] += len(out)
        self.proposer.rollback(seq.seq_id, seq.num_tokens + k)
        return out

    def release(self, seq_id: int) -> None:
        self.proposer.release(seq_id)

    def summary(self) -> dict[str, float]:
        s = self.stats
        return {**s, "spec_acceptance_rate": s["spec_accepted"] / s["spec_proposed"] if s["spec_proposed"] else 0.0,
                "spec_tokens_per_step": s["spec_emitted"] / s["spec_verify_steps"] if s["spec_verify_steps"] else 0.0}


def build_speculator(cfg: SpecConfig, target: Any, tokenizer: Any, num_blocks: int, block_size: int,
                     dtype: torch.dtype, draft: Any = None) -> Speculator | None:
    """The engine's speculator for ``cfg`` (None when off). ``draft``: a loaded model (``LoadedModel``
    or ``Transformer``) for method ``draft``; else ``cfg.draft`` is loaded with ``load_model``."""
    method = "draft" if draft is not None and cfg.method == "off" else cfg.method
    if method == "off":
        return None
    if method == "ngram":
        return Speculator(cfg, NgramProposer(cfg.ngram_max, cfg.ngram_min))
    if method == "self":
        keep = self_draft_layers(target.config.num_hidden_layers, cfg.self_keep_layers)
        return Speculator(cfg, ModelProposer(LayerSubset(target, keep), num_blocks, block_size, dtype))
    if draft is None:
        if not cfg.draft:
            raise SlimlmError("speculative method 'draft' needs a draft model (--draft MODEL)")
        from slimlm.loaders import load_model

        draft = load_model(cfg.draft, dtype)
    dmodel = getattr(draft, "model", draft)
    dtok = getattr(draft, "tokenizer", None)
    if dmodel.config.vocab_size != target.config.vocab_size:
        raise SlimlmError(f"the draft model's vocabulary ({dmodel.config.vocab_size}) differs from the target's "
                          f"({target.config.vocab_size}): speculation needs the same tokenizer")
    if tokenizer is not None and dtok is not None and tokenizer.backend.get_vocab() != dtok.backend.get_vocab():
        raise SlimlmError("the draft model's tokenizer differs from the target's: speculation needs the same tokenizer")
    return Speculator(cfg, ModelProposer(dmodel, num_blocks, block_size, dtype))


__all__ = ["SpecConfig", "Speculator", "build_speculator", "expected_tokens", "verify_greedy", "verify_sampled"]
