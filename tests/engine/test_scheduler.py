"""Scheduler invariants without a model.

A fake model reads its "KV" back from a shadow store that the scheduled steps write through the block
tables, and predicts the next token from what it read; the oracle computes the same function straight
from each request's token list. So if scheduling (chunking, prefix reuse, preemption by recompute,
copy-on-write) ever let a sequence read another's or a stale block, its output would differ from the
oracle's. Per step: token budget, max_num_seqs, each chunk starts where the sequence's cache ends.
"""

from __future__ import annotations

import random

import pytest

from slimlm.engine.sampling import SamplingConfig
from slimlm.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from slimlm.engine.sequence import Sequence, StopChecker
from slimlm.utils.errors import SlimlmError

V = 97


def next_token(history: list[int]) -> int:
    """The fake model: a function of the whole history (order-sensitive)."""
    h = 7
    for t in history:
        h = (h * 31 + t) % 1_000_003
    return h % V


def oracle(prompt: list[int], max_new: int, eos: int | None = None) -> list[int]:
    toks = list(prompt)
    out: list[int] = []
    while len(out) < max_new:
        t = next_token(toks)
        if t == eos:
            break
        toks.append(t)
        out.append(t)
    return out


class FakeRunner:
    def __init__(self, block_size: int):
        self.bs = block_size
        self.store: dict[int, int] = {}

    def run(self, sched: Scheduler, out: SchedulerOutput) -> dict[int, int]:
        bs = self.bs
        for src, dst in out.copies:
            for o in range(bs):
                if src * bs + o in self.store:
                    self.store[dst * bs + o] = self.store[src * bs + o]
        sampled = {}
        for s in out.seqs:
            assert len(s.table) * bs >= s.start + len(s.tokens)
            for i, t in enumerate(s.tokens):
                p = s.start + i
                self.store[s.table[p // bs] * bs + p % bs] = t
            if s.sample:
                n = s.start + len(s.tokens)
                sampled[s.seq_id] = next_token([self.store[s.table[p // bs] * bs + p % bs] for p in range(n)])
        return sampled


def check_step(sched: Scheduler, out: SchedulerOutput) -> None:
    cfg = sched.cfg
    assert out.num_tokens <= cfg.max_num_batched_tokens
    assert len(sched.running) <= cfg.max_num_seqs
    ids = [s.seq_id for s in out.seqs]
    assert len(ids) == len(set(ids)), "a sequence scheduled twice in one step"
    for s in out.seqs:
        seq = sched.seqs[s.seq_id]
        assert s.start == seq.num_computed and s.tokens == seq.tokens[s.start:s.start + len(s.tokens)]
        assert s.sample == (s.start + len(s.tokens) == seq.num_tokens)
    assert set(sched.kv.tables) == {s.seq_id for s in sched.running}
    sched.kv.check()


def drive(sched: Scheduler, rng: random.Random | None = None, abort_p: float = 0.0) -> list[Sequence]:
    runner = FakeRunner(sched.cfg.block_size)
    done: list[Sequence] = []
    for _ in range(10_000):
        if not sched.has_unfinished():
            break
        out = sched.schedule()
        check_step(sched, out)
        assert out.seqs, "no progress"
        sampled = runner.run(sched, out)
        done += sched.update(out, sampled)
        if rng is not None and rng.random() < abort_p and sched.seqs:
            victim = rng.choice(list(sched.seqs))
            before = sched.kv.pool.num_free
            held = len(sched.kv.tables.get(victim, []))
            assert sched.abort(victim)
            # freed at once (shared blocks stay with their other users)
            assert sched.kv.pool.num_free >= before + (held > 0) * 0 and victim not in sched.kv.tables
    assert not sched.has_unfinished()
    return done


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_match_the_oracle_and_leave_the_pool_empty(seed):
    rng = random.Random(seed)
    bs = rng.choice([2, 4, 16])
    cfg = SchedulerConfig(num_blocks=rng.randint(12, 40), block_size=bs, max_num_seqs=rng.randint(1, 6),
                          max_num_batched_tokens=rng.randint(4, 40), prefix_caching=seed % 3 != 0)
    sched = Scheduler(cfg)
    shared = [rng.randrange(V) for _ in range(rng.randint(0, 3 * bs))]
    reqs = {}
    for i in range(rng.randint(5, 14)):
        prompt = (shared if rng.random() < 0.6 else []) + [rng.randrange(V) for _ in range(rng.randint(1, 20))]
        max_new = rng.randint(1, 12)
        if cfg.block_size * cfg.num_blocks < len(prompt) + max_new:
            continue
        reqs[i] = (prompt, max_new)
        sched.add(Sequence(i, prompt, SamplingConfig(max_new_tokens=max_new)))
    abort_p = 0.05 if seed % 2 else 0.0
    done = drive(sched, rng, abort_p)
    for seq in done:
        prompt, max_new = reqs[seq.seq_id]
        assert seq.output_ids == oracle(prompt, max_new), f"request {seq.seq_id} diverged"
        assert seq.finish_reason == "length"
    if not abort_p:
        assert {s.seq_id for s in done} == set(reqs)
    pool = sched.kv.pool
    assert pool.num_free == pool.num_blocks and not any(pool.ref)


def test_chunked_prefill_keeps_decodes_running():
    sched = Scheduler(SchedulerConfig(num_blocks=64, block_size=4, max_num_batched_tokens=8))
    sched.add(Sequence(0, [1, 2, 3], SamplingConfig(max_new_tokens=20)))
    runner = FakeRunner(4)
    out = sched.schedule()
    sched.update(out, runner.run(sched, out))  # 0 prefilled, now decoding
    sched.add(Sequence(1, list(range(40)), SamplingConfig(max_new_tokens=2)))
    chunks = []
    while 1 in sched.seqs and sched.seqs[1].num_computed < 40:
        out = sched.schedule()
        check_step(sched, out)
        assert [s.seq_id for s in out.decodes] == [0], "the running decode was stalled"
        chunks += [len(s.tokens) for s in out.prefills]
        sched.update(out, runner.run(sched, out))
    assert chunks == [7] * 5 + [5]


def test_preemption_by_recompute_when_blocks_run_out():
    # 6 blocks of 2 tokens: two requests growing to 8 tokens each cannot both fit
    sched = Scheduler(SchedulerConfig(num_blocks=6, block_size=2, prefix_caching=False))
    sched.add(Sequence(0, [5, 6, 7], SamplingConfig(max_new_tokens=5)))
    sched.add(Sequence(1, [8, 9, 10], SamplingConfig(max_new_tokens=5)))
    done = drive(sched)
    assert sched.stats["preemptions"] >= 1
    assert sum(s.num_preemptions for s in done) == sched.stats["preemptions"]
    assert all(s.num_preemptions == 0 for s in done if s.seq_id == 0)  # the later arrival is the victim
    for s in done:
        assert s.output_ids == oracle([5, 6, 7] if s.seq_id == 0 else [8, 9, 10], 5)


def test_prefix_cache_hit_skips_the_cached_blocks():
    sched = Scheduler(SchedulerConfig(num_blocks=32, block_size=4))
    prompt = list(range(10, 24))  # 14 tokens: 3 full blocks
    sched.add(Sequence(0, prompt, SamplingConfig(max_new_tokens=2)))
    drive(sched)
    sched.add(Sequence(1, prompt, SamplingConfig(max_new_tokens=2)))
    out = sched.schedule()
    assert out.seqs[0].start == 12 and out.seqs[0].tokens == prompt[12:]
    assert sched.seqs[1].num_cached_prompt == 12 and sched.prefix_hit_rate == 12 / 28
    runner = FakeRunner(4)
    runner.store = {}  # (the previous run's store is gone: replay it to have the cached KV)
    sched2 = Scheduler(SchedulerConfig(num_blocks=32, block_size=4))
    for i in range(2):
        sched2.add(Sequence(i, prompt + [i], SamplingConfig(max_new_tokens=3)))
    done = drive(sched2)
    assert [s.output_ids for s in sorted(done, key=lambda s: s.seq_id)] == [oracle(prompt + [i], 3) for i in range(2)]


def test_abort_frees_blocks_at_once_and_bad_requests_raise():
    sched = Scheduler(SchedulerConfig(num_blocks=8, block_size=4))
    sched.add(Sequence(0, list(range(10)), SamplingConfig(max_new_tokens=4)))
    out = sched.schedule()
    assert sched.kv.pool.num_free == 5
    assert sched.abort(0) and sched.kv.pool.num_free == 8 and not sched.has_unfinished()
    assert sched.update(out, {0: 1}) == []  # a late result for an aborted request is dropped
    assert sched.schedule().aborted == [0]
    assert not sched.abort(0)
    with pytest.raises(SlimlmError, match="KV blocks"):
        sched.add(Sequence(1, list(range(30)), SamplingConfig(max_new_tokens=10)))
    with pytest.raises(SlimlmError, match="at least one"):
        sched.add(Sequence(2, [], SamplingConfig()))


def test_eos_and_max_len_finish_reasons():
    eos = next_token([1, 2, 3])
    sched = Scheduler(SchedulerConfig(num_blocks=8, block_size=4))
    sched.add(Sequence(0, [1, 2, 3], SamplingConfig(max_new_tokens=5), eos_ids=frozenset({eos})))
    sched.add(Sequence(1, [4, 5, 6], SamplingConfig(max_new_tokens=50), max_len=7))
    done = {s.seq_id: s for s in drive(sched)}
    assert done[0].finish_reason == "eos" and done[0].output_ids == []
    assert done[1].finish_reason == "length" and done[1].num_tokens == 7


class CharTokenizer:
    """Token i decodes to letter i % 26 (enough for StreamDecoder)."""

    def decode(self, ids, skip_special_tokens=True):  # type: ignore[no-untyped-def]
        return "".join(chr(97 + i % 26) for i in ids)


def test_stop_strings_are_found_incrementally_across_token_boundaries():
    rng = random.Random(3)
    for _ in range(200):
        toks = [rng.randrange(4) for _ in range(rng.randint(1, 30))]  # letters a-d
        stops = ["".join(rng.choice("abcd") for _ in range(rng.randint(1, 4))) for _ in range(2)]
        sc = StopChecker(CharTokenizer(), stops)
        hit_at = None
        for n, t in enumerate(toks):
            if sc.feed(t) is not None:
                hit_at = n
                break
        full = CharTokenizer().decode(toks)
        first = [(full.find(s) + len(s), full.find(s)) for s in stops if s in full]
        if not first:
            assert hit_at is None and sc.text == full
            continue
        end, _ = min(first)  # the earliest completed stop string ends the stream there
        assert hit_at == end - 1
        prefix = full[:end]
        assert sc.text == prefix[:min(prefix.find(s) for s in stops if s in prefix)]
