"""Continuous-batching scheduler: counts tokens, not phases, and returns a plain dataclass per step.

Each step has a token budget (``max_num_batched_tokens``). Running sequences go first, in arrival
order: a decode takes 1 token, a sequence still prefilling takes the next chunk of its prompt that
fits the budget (chunked prefill: a long prompt never stalls the running decodes for more than one
budget's worth of tokens). Then waiting sequences are admitted in arrival order while the budget,
``max_num_seqs`` and the free KV blocks allow; an admitted sequence first adopts the blocks of its
longest cached prefix (prefix caching, :mod:`slimlm.engine.block_pool`), so it computes only the
rest. When a running sequence needs a block and none is free, the latest-arrived running sequence is
preempted by recompute: its blocks are freed and it goes back to the front of the queue, to re-run
its prompt and the tokens it generated so far (often mostly from the prefix cache). No sequence is
admitted in a step that preempted. :meth:`Scheduler.abort` frees a request's blocks at once.

The scheduler never touches a tensor (tests/engine/test_scheduler.py runs it without a model): the
runner executes :class:`SchedulerOutput`, the engine samples, and :meth:`Scheduler.update` records
the sampled tokens and retires finished sequences.

Example::

    sched = Scheduler(SchedulerConfig(num_blocks=64))
    sched.add(Sequence(0, prompt_ids, SamplingConfig(max_new_tokens=8)))
    out = sched.schedule()           # out.seqs[0]: start 0, the prompt's first chunk
    finished = sched.update(out, {0: next_token})
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import ClassVar

from slimlm.engine.block_pool import BlockPool, KVCacheManager
from slimlm.engine.sequence import SeqStatus, Sequence
from slimlm.utils.config import BaseConfig, register_config
from slimlm.utils.errors import ConfigError, SlimlmError


@register_config
@dataclass
class SchedulerConfig(BaseConfig):
    kind: ClassVar[str] = "scheduler"
    num_blocks: int = field(default=0, metadata={"min": 0, "help": "KV blocks in the pool (0 = from kv_budget_gib)"})
    kv_budget_gib: float = field(default=1.0, metadata={"gt": 0, "help": "KV memory budget in GiB when num_blocks is 0"})
    block_size: int = field(default=16, metadata={"min": 1, "help": "tokens per KV block"})
    max_num_seqs: int = field(default=16, metadata={"min": 1, "help": "sequences running at once at most"})
    max_num_batched_tokens: int = field(default=512, metadata={"min": 1, "help": "token budget of one step (chunked prefill)"})
    prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks of equal prompt prefixes"})

    def validate(self) -> None:
        if self.num_blocks < 0 or self.block_size < 1 or self.kv_budget_gib <= 0:
            raise ConfigError("num_blocks must be >= 0, block_size >= 1 and kv_budget_gib > 0")
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_seqs and max_num_batched_tokens must be >= 1")


@dataclass
class ScheduledSeq:
    """One sequence's share of a step: run ``tokens`` at positions ``start .. start + len - 1``."""

    seq_id: int
    start: int  # tokens whose KV is already cached
    tokens: list[int]
    table: list[int]  # its block table (covers start + len(tokens) slots)
    sample: bool  # the chunk ends at the last known token: sample the next one
    prefill: bool  # part of the prompt (or of a recompute after preemption), not a plain decode
    draft: list[int] = field(default_factory=list)  # speculative tokens appended to ``tokens`` (to verify)


@dataclass
class SchedulerOutput:
    """What one step runs; ``copies`` are copy-on-write block copies to run before the forward."""

    seqs: list[ScheduledSeq] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[int] = field(default_factory=list)  # sent back to the queue in this step
    aborted: list[int] = field(default_factory=list)  # cancelled since the last step (blocks freed)

    @property
    def num_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.seqs)

    @property
    def prefills(self) -> list[ScheduledSeq]:
        return [s for s in self.seqs if s.prefill]

    @property
    def decodes(self) -> list[ScheduledSeq]:
        return [s for s in self.seqs if not s.prefill]


class Scheduler:
    """Waiting / running queues over a :class:`KVCacheManager`; ``schedule`` -> run -> ``update``."""

    def __init__(self, cfg: SchedulerConfig):
        if cfg.num_blocks < 1:
            raise ConfigError("SchedulerConfig.num_blocks must be set (>= 1)")
        self.cfg = cfg
        self.kv = KVCacheManager(BlockPool(cfg.num_blocks, cfg.block_size, cfg.prefix_caching))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[int, Sequence] = {}
        self._aborted: list[int] = []
        self.stats = {"preemptions": 0, "prefix_hit_tokens": 0, "prompt_tokens": 0, "steps": 0}

    # --- requests ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if not seq.prompt_ids:
            raise SlimlmError("a request needs at least one prompt token")
        if seq.seq_id in self.seqs:
            raise SlimlmError(f"sequence id {seq.seq_id} is already scheduled")
        self.check_fits(seq)
        seq.status = SeqStatus.WAITING
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def check_fits(self, seq: Sequence) -> None:
        """Raise if ``seq`` could not run even with the whole pool to itself."""
        total = seq.prompt_len + seq.params.max_new_tokens
        if seq.max_len is not None:
            total = min(total, seq.max_len)
        if self.kv.blocks_for(total) > self.cfg.num_blocks:
            raise SlimlmError(f"request needs up to {self.kv.blocks_for(total)} KV blocks ({total} tokens); "
                              f"the pool holds {self.cfg.num_blocks}")

    def fork(self, parent_id: int, child: Sequence, token: int) -> str | None:
        """Start ``child`` (the same prompt as the running ``parent_id``, whose prompt KV is computed)
        on the parent's blocks, with its own first ``token``; no prompt recompute (copy-on-write
        copies the shared last block on the first write). Returns the child's finish reason, if any."""
        parent = self.seqs[parent_id]
        if child.seq_id in self.seqs or child.prompt_ids != parent.prompt_ids:
            raise SlimlmError(f"cannot fork {child.seq_id} from {parent_id}")
        self.kv.fork(parent_id, child.seq_id)
        child.num_computed = child.prompt_len
        child.status = SeqStatus.RUNNING
        self.seqs[child.seq_id] = child
        self.running.append(child)
        self.stats["prompt_tokens"] += child.prompt_len
        self.stats["prefix_hit_tokens"] += child.prompt_len
        reason = child.append(token)
        if reason is not None:
            self._retire(child, reason)
        return reason

    def _retire(self, seq: Sequence, reason: str) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        del self.seqs[seq.seq_id]
        seq.status, seq.finish_reason = SeqStatus.FINISHED, reason

    def abort(self, seq_id: int) -> bool:
        """Cancel a request: its blocks return to the pool now. False if it is not scheduled."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return False
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.kv.free(seq_id)
        seq.status, seq.finish_reason = SeqStatus.FINISHED, "abort"
        self._aborted.append(seq_id)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    # --- one step ---------------------------------------------------------------------------------
    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        seq.draft = []
        self.kv.free(seq.seq_id)
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq.seq_id)
        self.stats["preemptions"] += 1

    def _emit(self, seq: Sequence, n: int, copies: list[tuple[int, int]], out: SchedulerOutput,
              draft: list[int] | None = None) -> None:
        start = seq.num_computed
        out.copies += copies
        out.seqs.append(ScheduledSeq(seq.seq_id, start, seq.tokens[start:start + n] + (draft or []),
                                     self.kv.tables[seq.seq_id], sample=start + n == seq.num_tokens,
                                     prefill=n > 1 or start < seq.prompt_len, draft=list(draft or [])))

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(aborted=self._aborted)
        self._aborted = []
        budget = self.cfg.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            # a decode carries its speculative draft when the budget and the free blocks allow
            draft = seq.draft if n == seq.num_tokens - seq.num_computed == 1 and len(seq.draft) < budget else []
            seq.draft = []
            copies = self.kv.allocate(seq.seq_id, seq.num_computed, seq.num_computed + n + len(draft))
            if copies is None and draft:
                draft = []  # no room to verify: decode one token
                copies = self.kv.allocate(seq.seq_id, seq.num_computed, seq.num_computed + n)
            while copies is None:  # out of blocks: recompute the latest arrival later
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    break
                copies = self.kv.allocate(seq.seq_id, seq.num_computed, seq.num_computed + n)
            if copies is None:
                break
            self._emit(seq, n, copies, out, draft)
            budget -= n + len(draft)
            i += 1
        while not out.preempted and self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.kv.match_prefix(seq.tokens, seq.cache_salt)
            cached = len(prefix) * self.cfg.block_size
            n = min(seq.num_tokens - cached, budget)
            copies = self.kv.allocate(seq.seq_id, cached, cached + n, prefix, seq.cache_salt)
            if copies is None:
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            if seq.num_preemptions == 0:
                seq.num_cached_prompt = cached
                self.stats["prefix_hit_tokens"] += cached
                self.stats["prompt_tokens"] += seq.prompt_len
            seq.num_computed = cached
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            self._emit(seq, n, copies, out)
            budget -= n
        self.stats["steps"] += 1
        return out

    def update(self, out: SchedulerOutput, sampled: dict[int, int] | dict[int, list[int]]) -> list[Sequence]:
        """After the runner: advance each scheduled sequence, append its sampled token(s), retire the
        finished ones (blocks freed). Returns the sequences that finished in this step.

        A speculative entry gets a list: its accepted draft tokens then one more (1 .. 1 + len(draft)
        tokens); the KV of the rejected drafts is rolled back (blocks past the computed tokens freed)."""
        finished = []
        for s in out.seqs:
            seq = self.seqs.get(s.seq_id)
            if seq is None or seq.status is not SeqStatus.RUNNING:
                continue  # aborted or preempted meanwhile
            seq.draft = []
            if not s.sample:
                seq.num_computed = s.start + len(s.tokens)
                self.kv.commit(seq.seq_id, seq.tokens, seq.num_computed)
                continue
            got = sampled[s.seq_id]
            toks = got if isinstance(got, list) else [got]
            if not 1 <= len(toks) <= 1 + len(s.draft):
                raise SlimlmError(f"sequence {s.seq_id}: {len(toks)} tokens for a step with {len(s.draft)} drafts")
            # computed: the chunk without its drafts, plus the accepted drafts (all but the last token)
            seq.num_computed = s.start + len(s.tokens) - len(s.draft) + len(toks) - 1
            reason = None
            for t in toks:
                reason = seq.append(t)
                if reason is not None:
                    break
            self.kv.commit(seq.seq_id, seq.tokens, min(seq.num_computed, seq.num_tokens))
            if reason is not None:
                self._retire(seq, reason)
                finished.append(seq)
                continue
            if s.draft:
                self.kv.truncate(seq.seq_id, seq.num_computed)
        return finished

    @property
    def prefix_hit_rate(self) -> float:
        p = self.stats["prompt_tokens"]
        return self.stats["prefix_hit_tokens"] / p if p else 0.0
