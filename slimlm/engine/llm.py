"""The serving engine's loop and its offline API: ``LLM(model).generate(prompts, params)``.

:class:`LLMEngine` owns a :class:`~slimlm.engine.scheduler.Scheduler` (block pool, queues) and a
:class:`~slimlm.engine.runner.ModelRunner` (paged KV tensors). ``step()`` = schedule -> one forward
of the ragged batch -> sample each sequence that reached its last token with its own parameters ->
update (stop checks, finished sequences free their blocks). Requests can be added and aborted between
steps (a server drives the same loop).

Sampling follows :func:`slimlm.engine.sampling.choose` per request: greedy rows without a repetition
penalty are one batched argmax; other rows use the request's own generator (seeded by its ``seed``),
so a request's samples do not depend on what else is in the batch.

Example::

    from slimlm.engine.llm import LLM
    from slimlm.engine.sampling import SamplingConfig
    llm = LLM("smollm2-135m")
    outs = llm.generate(["The capital of France is", "1, 2, 3,"], SamplingConfig(max_new_tokens=16))
    print(outs[0].text, outs[0].finish_reason)
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slimlm.engine.block_pool import blocks_for_bytes
from slimlm.engine.generate import eos_ids
from slimlm.engine.runner import BatchEntry, ModelRunner, kv_bytes_per_token
from slimlm.engine.sampling import SamplingConfig, choose
from slimlm.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from slimlm.engine.sequence import Sequence, StopChecker
from slimlm.engine.spec import SpecConfig, build_speculator
from slimlm.models.kv_policy import KVPolicy
from slimlm.models.transformer import Transformer
from slimlm.peft.serving import MultiLora
from slimlm.utils.errors import SlimlmError


class UnknownAdapter(SlimlmError):
    """A request names a LoRA adapter that is not loaded (HTTP 404)."""


@dataclass
class TokenLogprob:
    """log p(token) under the model (raw logits, before temperature / top-k / top-p) and the ``top``
    most likely alternatives, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class RequestOutput:
    request_id: int
    prompt_ids: list[int]
    token_ids: list[int]  # generated tokens (an end token excluded)
    text: str  # detokenized output, cut before a stop string ("" without a tokenizer)
    finish_reason: str | None  # "eos" | "stop" | "length" | "abort" | None while running
    num_cached_prompt_tokens: int = 0  # prompt tokens served from the prefix cache
    new_token: int | None = None  # the last token this step added (streaming), if any
    logprobs: list[TokenLogprob] | None = None  # per generated token, when the request asked for them
    new_token_ids: list[int] = dataclasses.field(default_factory=list)  # all tokens this step added (speculation: several)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


def _output(seq: Sequence, new: list[int]) -> RequestOutput:
    return RequestOutput(seq.seq_id, list(seq.prompt_ids), seq.output_ids, seq.text, seq.finish_reason,
                         seq.num_cached_prompt, new[-1] if new else None,
                         list(seq.state["logprobs"]) if "logprobs" in seq.state else None, list(new))


class LLMEngine:
    """Continuous batching over one model. ``add_request`` / ``abort`` / ``step`` / ``has_unfinished``."""

    def __init__(self, model: Transformer, tokenizer: Any = None, cfg: SchedulerConfig | None = None,
                 kv_dtype: torch.dtype | None = None, spec: SpecConfig | None = None, draft: Any = None,
                 kv_policy: KVPolicy | None = None):
        cfg = cfg or SchedulerConfig()
        c = model.config
        dtype = kv_dtype or model.dtype
        self.kv_policy = kv_policy or KVPolicy()
        per_token = kv_bytes_per_token(c, self.kv_policy, torch.empty(0, dtype=dtype).element_size())
        num_blocks = cfg.num_blocks or blocks_for_bytes(  # the budget in the policy's own bytes per token
            cfg.kv_budget_gib * 2**30, 1, 1, per_token // 2, cfg.block_size, 1)
        self.cfg = dataclasses.replace(cfg, num_blocks=num_blocks)
        self.model, self.tokenizer = model, tokenizer
        self.scheduler = Scheduler(self.cfg)
        self.runner = ModelRunner(model, num_blocks, cfg.block_size, dtype, self.kv_policy)
        self.eos = frozenset(eos_ids(model, tokenizer))
        self.max_len = c.max_position_embeddings
        self._next_id = 0
        self._forks: dict[int, list[Sequence]] = {}  # group head id -> members waiting for its prompt
        self.spec = build_speculator(spec or SpecConfig(), model, tokenizer, num_blocks, cfg.block_size, dtype, draft)
        self._structured: Any = None  # the vocabulary index of structured output, built on first use
        self._salts: dict[str, int] = {}  # adapter name -> prefix-cache salt of its sequences
        self._adapter_gen = 0

    # --- LoRA adapters resident at once (multi-LoRA serving, :mod:`slimlm.peft.serving`) -------------
    @property
    def adapters(self) -> list[str]:
        """Names of the loaded LoRA adapters (requests choose one with ``adapter=``)."""
        return self.runner.lora.names if self.runner.lora is not None else []

    def add_adapter(self, name: str, path: str | Path) -> list[str]:
        """Load the peft-format LoRA adapter folder ``path`` as ``name`` (between steps); returns the
        runtime paths it covers. Its requests' KV blocks get their own prefix-cache chain."""
        if self.runner.lora is None:
            self.runner.lora = MultiLora(self.model)
        paths = self.runner.lora.add(name, path)
        self._adapter_gen += 1
        self._salts[name] = hash(("lora", name, self._adapter_gen))  # a re-loaded name never hits old blocks
        return paths

    def remove_adapter(self, name: str) -> None:
        """Unload adapter ``name``; refused while a request uses it."""
        if name not in self.adapters:
            raise SlimlmError(f"no adapter named {name!r} is loaded (loaded: {self.adapters})")
        users = [s for s in [*self.scheduler.seqs.values(), *(k for ks in self._forks.values() for k in ks)]
                 if s.adapter == name]
        if users:
            raise SlimlmError(f"adapter {name!r} is in use by {len(users)} request(s): unload it when they finish")
        assert self.runner.lora is not None
        self.runner.lora.remove(name)
        del self._salts[name]

    def _make_seq(self, prompt_ids: Seq[int], params: SamplingConfig | None, request_id: int | None,
                  logprobs: int | None, response_format: dict[str, Any] | None = None,
                  adapter: str | None = None) -> Sequence:
        if adapter is not None and adapter not in self._salts:
            raise UnknownAdapter(f"unknown adapter {adapter!r} (loaded: {self.adapters})")
        params = params or SamplingConfig()
        params.validate()
        ids = [int(t) for t in prompt_ids]
        vocab = self.model.config.vocab_size
        if not ids:
            raise SlimlmError("a request needs at least one prompt token")
        if any(t < 0 or t >= vocab for t in ids):
            raise SlimlmError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) >= self.max_len:
            raise SlimlmError(f"prompt has {len(ids)} tokens; the model's context is {self.max_len}")
        rid = self._next_id if request_id is None else request_id
        self._next_id = max(self._next_id, rid + 1)
        checker = StopChecker(self.tokenizer, params.stop) if self.tokenizer is not None else None
        seq = Sequence(rid, ids, params, eos_ids=self.eos, max_len=self.max_len, stop_checker=checker,
                       adapter=adapter, cache_salt=None if adapter is None else self._salts[adapter])
        if not params.greedy:
            seq.state["gen"] = torch.Generator().manual_seed(params.seed)
        if logprobs is not None:
            if not 0 <= logprobs <= 20:
                raise SlimlmError("logprobs must be between 0 and 20")
            seq.state["logprobs_k"], seq.state["logprobs"] = logprobs, []
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(1, vocab, dtype=torch.bool)
            seen[0, ids] = True
            seq.state["seen"] = seen
        if response_format is not None and response_format.get("type", "text") != "text":
            seq.constraint = self.constraint(response_format)
        return seq

    def constraint(self, response_format: dict[str, Any]) -> Any:
        """The token-mask constraint of a ``response_format`` (raises SlimlmError for a bad one)."""
        from slimlm.engine.structured import StructuredIndex, compile_format

        grammar = compile_format(response_format)
        if self.tokenizer is None:
            raise SlimlmError("structured output needs a model with a tokenizer")
        if self._structured is None:
            self._structured = StructuredIndex(self.tokenizer, self.model.config.vocab_size, self.eos)
        return self._structured.constraint(grammar)

    def add_request(self, prompt_ids: Seq[int], params: SamplingConfig | None = None,
                    request_id: int | None = None, logprobs: int | None = None,
                    response_format: dict[str, Any] | None = None, adapter: str | None = None) -> int:
        """Queue a request; returns its id. ``logprobs=k`` records each generated token's log
        probability and the k most likely alternatives; ``response_format`` (OpenAI's: ``json_object``,
        ``json_schema``, or ``regex``) constrains the output; ``adapter`` names a loaded LoRA adapter
        (:meth:`add_adapter`). Raises SlimlmError for a request that cannot run."""
        seq = self._make_seq(prompt_ids, params, request_id, logprobs, response_format, adapter)
        self.scheduler.add(seq)
        return seq.seq_id

    def add_group(self, prompt_ids: Seq[int], params: Seq[SamplingConfig], logprobs: int | None = None,
                  response_format: dict[str, Any] | None = None, adapter: str | None = None) -> list[int]:
        """Several samples of one prompt (OpenAI's ``n``): the prompt is computed once, then every
        other member forks the first one's blocks and samples its own first token from the same logits."""
        first = self._make_seq(prompt_ids, params[0], None, logprobs, response_format, adapter)
        rest = [self._make_seq(prompt_ids, p, None, logprobs, response_format, adapter) for p in params[1:]]
        for s in rest:
            self.scheduler.check_fits(s)
        self.scheduler.add(first)
        if rest:
            self._forks[first.seq_id] = rest
        return [first.seq_id] + [s.seq_id for s in rest]

    def abort(self, request_id: int) -> bool:
        """Cancel a request; its KV blocks are free when this returns."""
        for kids in self._forks.values():
            for k in kids:
                if k.seq_id == request_id:  # not started yet
                    kids.remove(k)
                    k.finish_reason = "abort"
                    return True
        kids = self._forks.pop(request_id, [])
        found = self.scheduler.abort(request_id)
        if self.spec is not None:
            self.spec.release(request_id)
        if kids:  # the group's first member went away before its prompt was done: the next one takes over
            self.scheduler.add(kids[0])
            if kids[1:]:
                self._forks[kids[0].seq_id] = kids[1:]
        return found

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or any(self._forks.values())

    def _sample(self, logits: torch.Tensor, rows: list[ScheduledSeq]) -> dict[int, int]:
        """logits: [n, V] float32 for ``rows`` -> {seq_id: token}."""
        seqs = [self.scheduler.seqs[r.seq_id] for r in rows]
        plain = [i for i, s in enumerate(seqs) if s.params.greedy and "seen" not in s.state and s.constraint is None]
        out: dict[int, int] = {}
        if plain:
            toks = logits[plain].argmax(-1).tolist()
            out.update({seqs[i].seq_id: t for i, t in zip(plain, toks, strict=True)})
        for i, s in enumerate(seqs):
            if s.seq_id not in out:
                out[s.seq_id] = self._choose(logits[i:i + 1], s)
        return out

    @staticmethod
    def _choose(row: torch.Tensor, s: Sequence) -> int:
        """One token for ``s`` from logits ``[1, V]`` with its own parameters, generator and
        structured-output mask (tokens the constraint forbids get -inf before argmax / sampling)."""
        if s.constraint is not None:
            row = row.masked_fill(~s.constraint.mask(), float("-inf"))
        seen = s.state.get("seen")
        t = int(choose(row, s.params, seen, s.state.get("gen"))[0])
        if seen is not None:
            seen[0, t] = True
        return t

    @staticmethod
    def _logprob(row: torch.Tensor, k: int, token: int) -> TokenLogprob:
        """log p(token) and the top ``k`` alternatives from raw logits ``[V]``."""
        lp = row.log_softmax(-1)  # [V] float32
        top = lp.topk(k) if k else None
        return TokenLogprob(token, float(lp[token]), [] if top is None else list(
            zip(top.indices.tolist(), top.values.tolist(), strict=True)))

    def step(self) -> list[RequestOutput]:
        """One scheduling step; returns an output for every request that got tokens or finished."""
        sched, spec = self.scheduler, self.spec
        if spec is not None:
            spec.propose(sched.running)
        out = sched.schedule()
        if spec is not None:
            for sid in out.preempted:
                spec.release(sid)
        results: list[RequestOutput] = []
        if not out.seqs:
            if sched.has_unfinished():
                raise SlimlmError("scheduler made no progress (KV pool too small for the waiting request)")
            return results
        entries = [BatchEntry(s.table, s.start, s.tokens, s.sample, 1 + len(s.draft), sched.seqs[s.seq_id].adapter)
                   for s in out.seqs]
        t0 = time.perf_counter()
        logits = self.runner.forward(entries, out.copies)
        if spec is not None:
            spec.observe_step(out.num_tokens, len(out.seqs), time.perf_counter() - t0)
        rows = [s for s in out.seqs if s.sample]
        blocks, off = [], 0  # per row: logits [1 + len(draft), V]
        for r in rows:
            blocks.append(logits[off:off + 1 + len(r.draft)])
            off += 1 + len(r.draft)
        plain = [i for i, r in enumerate(rows) if not r.draft]
        sampled: dict[int, list[int]] = {}
        if plain:
            got = self._sample(torch.cat([blocks[i] for i in plain]), [rows[i] for i in plain])
            sampled = {sid: [t] for sid, t in got.items()}
        for i, r in enumerate(rows):
            if r.draft:
                assert spec is not None
                sampled[r.seq_id] = spec.verify(sched.seqs[r.seq_id], blocks[i], r.draft)
        lps: dict[int, list[TokenLogprob]] = {}
        for i, r in enumerate(rows):
            k = sched.seqs[r.seq_id].state.get("logprobs_k")
            if k is not None:
                lps[r.seq_id] = [self._logprob(blocks[i][j], k, t) for j, t in enumerate(sampled[r.seq_id])]
        for i, r in enumerate(rows):  # group members start from their head's prompt logits
            kids = self._forks.pop(r.seq_id, None) if r.start + len(r.tokens) == sched.seqs[r.seq_id].prompt_len \
                else None
            for kid in kids or []:
                t = self._choose(blocks[i][:1], kid)
                k = kid.state.get("logprobs_k")
                sched.fork(r.seq_id, kid, t)
                results.append(self._record(kid, 0, None if k is None else [self._logprob(blocks[i][0], k, t)]))
        before = {r.seq_id: sched.seqs[r.seq_id].num_output for r in rows}
        finished = {s.seq_id: s for s in sched.update(out, sampled)}
        for r in rows:
            seq = finished.get(r.seq_id) or sched.seqs.get(r.seq_id)
            if seq is not None:
                results.append(self._record(seq, before[r.seq_id], lps.get(r.seq_id)))
        if spec is not None:
            for sid in finished:
                spec.release(sid)
        return results

    @staticmethod
    def _record(seq: Sequence, before: int, lps: list[TokenLogprob] | None) -> RequestOutput:
        """After the step appended tokens to ``seq`` (it had ``before`` output tokens) or ended it:
        complete its text, keep the logprobs of the tokens that joined the output."""
        if seq.finish_reason not in (None, "stop") and seq.stop_checker is not None:
            seq.stop_checker.flush()
        new = seq.output_ids[before:]  # an end token is not part of the output
        if lps is not None:
            seq.state["logprobs"].extend(lps[:len(new)])
        return _output(seq, new)

    @property
    def stats(self) -> dict[str, float]:
        pool = self.scheduler.kv.pool
        spec = self.spec.summary() if self.spec is not None else {
            "spec_proposed": 0, "spec_accepted": 0, "spec_acceptance_rate": 0.0, "spec_tokens_per_step": 0.0}
        return {**self.scheduler.stats, "running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting), "kv_blocks_used": pool.num_used,
                "kv_blocks_total": pool.num_blocks, "prefix_hit_rate": self.scheduler.prefix_hit_rate, **spec}


class LLM:
    """Offline batch generation through the engine.

    Args:
        model: what ``slimlm.loaders.load_model`` takes (alias, GGUF, HF or slimlm folder) or a
            loaded ``LoadedModel``.
        config: KV pool and batching limits (:class:`SchedulerConfig`).
        spec: speculative decoding (:class:`SpecConfig`: ``spec="ngram"|"self"``, or ``draft=MODEL``).
        draft: an already loaded draft model (instead of ``spec.draft``).
    """

    def __init__(self, model: Any, config: SchedulerConfig | None = None, dtype: torch.dtype = torch.float32,
                 spec: SpecConfig | None = None, draft: Any = None):
        if isinstance(model, str):
            from slimlm.loaders import load_model

            model = load_model(model, dtype)
        self.tokenizer = model.tokenizer
        self.engine = LLMEngine(model.model, model.tokenizer, config, spec=spec, draft=draft)

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]],
                 params: SamplingConfig | Seq[SamplingConfig] | None = None,
                 response_format: dict[str, Any] | None = None,
                 adapters: str | None | Seq[str | None] = None) -> list[RequestOutput]:
        """Generate for every prompt (text, or token ids); outputs in prompt order. ``response_format``
        (OpenAI's json_object / json_schema, or regex) constrains every output; ``adapters`` names the
        LoRA adapter (``engine.add_adapter``) of every prompt, or one per prompt (None: the base)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingConfig):
            plist = [params or SamplingConfig()] * len(prompts)
        else:
            plist = list(params)
        if len(plist) != len(prompts):
            raise SlimlmError(f"{len(prompts)} prompts but {len(plist)} sampling configs")
        ids = []
        for p in prompts:
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise SlimlmError("text prompts need a model with a tokenizer; pass token ids")
                ids.append(self.tokenizer.encode(p))
            else:
                ids.append(list(p))
        alist = list(adapters) if adapters is not None and not isinstance(adapters, str) else [adapters] * len(ids)
        if len(alist) != len(ids):
            raise SlimlmError(f"{len(ids)} prompts but {len(alist)} adapters")
        rids: list[int] = []
        try:
            for i, pr, ad in zip(ids, plist, alist, strict=True):
                rids.append(self.engine.add_request(i, pr, response_format=response_format, adapter=ad))
        except SlimlmError:
            for r in rids:  # all or nothing
                self.engine.abort(r)
            raise
        done: dict[int, RequestOutput] = {}
        while self.engine.has_unfinished():
            for o in self.engine.step():
                if o.finished:
                    done[o.request_id] = o
        return [done[r] for r in rids]
