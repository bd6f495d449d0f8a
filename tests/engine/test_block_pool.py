"""Block pool / block tables without a model: random workloads against a shadow copy of the cache.

The oracle is a dict ``slot -> token`` standing in for the KV tensors: writes go through the slots the
manager hands out and its copy-on-write copies are applied to it, so after every operation each
sequence must read back exactly its own tokens (a block shared wrongly, freed early or reused while
referenced shows up as a wrong token), and the pool's reference counts must equal table memberships.
"""

from __future__ import annotations

import random

import pytest

from slimlm.engine.block_pool import BlockPool, KVCacheManager, blocks_for_bytes
from slimlm.utils.errors import SlimlmError


class Shadow:
    """A manager plus the fake KV contents: ``store[slot]`` = the token whose KV the slot holds."""

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True):
        self.kv = KVCacheManager(BlockPool(num_blocks, block_size, prefix_caching))
        self.store: dict[int, int] = {}
        self.tokens: dict[int, list[int]] = {}  # seq -> tokens
        self.computed: dict[int, int] = {}  # seq -> tokens with KV written

    def write(self, seq: int, start: int, end: int, prefix: list[int] | None = None) -> bool:
        copies = self.kv.allocate(seq, start, end, prefix or [])
        if copies is None:
            return False
        bs = self.kv.block_size
        for src, dst in copies:
            for o in range(bs):
                if src * bs + o in self.store:
                    self.store[dst * bs + o] = self.store[src * bs + o]
        for p in range(start, end):
            self.store[self.kv.slot(seq, p)] = self.tokens[seq][p]
        self.computed[seq] = end
        self.kv.commit(seq, self.tokens[seq], end)
        return True

    def add(self, seq: int, tokens: list[int]) -> bool:
        self.tokens[seq] = tokens
        prefix = self.kv.match_prefix(tokens)
        ok = self.write(seq, len(prefix) * self.kv.block_size, len(tokens), prefix)
        if not ok:
            del self.tokens[seq]
        return ok

    def verify(self) -> None:
        self.kv.check()
        for seq, toks in self.tokens.items():
            got = [self.store.get(self.kv.slot(seq, p)) for p in range(self.computed[seq])]
            assert got == toks[:self.computed[seq]], f"sequence {seq} reads wrong KV"

    def drop(self, seq: int) -> None:
        self.kv.free(seq)
        del self.tokens[seq], self.computed[seq]


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_random_add_fork_append_cancel_finish_keeps_invariants(prefix_caching):
    for it in range(150):
        rng = random.Random(it)
        bs = rng.choice([1, 2, 4, 16])
        sh = Shadow(rng.randint(4, 40), bs, prefix_caching)
        prefixes = [[rng.randrange(50) for _ in range(rng.randint(0, 3 * bs))] for _ in range(3)]
        next_id = 0
        for _ in range(60):
            op = rng.random()
            live = list(sh.tokens)
            if op < 0.35 or not live:
                toks = rng.choice(prefixes) + [rng.randrange(50) for _ in range(rng.randint(1, 2 * bs))]
                sh.add(next_id, toks)
                next_id += 1
            elif op < 0.5:
                parent = rng.choice(live)
                sh.kv.fork(parent, next_id)
                sh.tokens[next_id] = list(sh.tokens[parent])
                sh.computed[next_id] = sh.computed[parent]
                next_id += 1
            elif op < 0.8:
                seq = rng.choice(live)
                n = rng.randint(1, bs + 2)
                start = sh.computed[seq]
                sh.tokens[seq] = sh.tokens[seq][:start] + [rng.randrange(50) for _ in range(n)]
                if not sh.write(seq, start, start + n):
                    sh.drop(seq)  # out of blocks: preempt (free everything)
            else:
                sh.drop(rng.choice(live))  # cancel or finish: blocks freed at once
            sh.verify()
        for seq in list(sh.tokens):
            sh.drop(seq)
        sh.verify()
        pool = sh.kv.pool
        assert pool.num_free == pool.num_blocks and not any(pool.ref), f"leak in iteration {it}"


def test_prefix_hits_return_the_same_block_ids():
    sh = Shadow(16, 4)
    sys_prompt = list(range(100, 110))  # 2 full blocks + 2 tokens
    assert sh.add(0, sys_prompt + [1, 2, 3])
    t0 = sh.kv.tables[0]
    # a second request with the same first 12 tokens (3 full blocks) while the first is alive
    prefix = sh.kv.match_prefix(sys_prompt + [1, 2, 9, 9, 9])
    assert prefix == t0[:3]
    assert sh.add(1, sys_prompt + [1, 2, 9, 9, 9])
    assert sh.kv.tables[1][:3] == t0[:3] and sh.kv.tables[1][3] != t0[3]
    assert [sh.kv.pool.ref[b] for b in t0[:3]] == [2, 2, 2]
    sh.verify()
    # a different second block breaks the chain after the first block
    assert sh.kv.match_prefix(sys_prompt[:4] + [0] * 10) == t0[:1]
    # after both finish, the blocks stay cached (unreferenced) and hit again
    sh.drop(0)
    sh.drop(1)
    assert sh.kv.match_prefix(sys_prompt + [1, 2, 7]) == t0[:3]
    # a prompt that is exactly the cached blocks still computes its last token
    assert sh.kv.match_prefix(sys_prompt + [1, 2]) == t0[:2]


def test_equal_blocks_after_different_prefixes_are_not_shared():
    """A block's KV depends on everything before it: equal tokens after a different prefix miss."""
    sh = Shadow(16, 2)
    x, w, y = [1, 2], [3, 4], [5, 6]
    assert sh.add(0, x + y + [9])  # caches [x] and [x y]
    assert sh.add(1, w + [9])  # caches [w]
    assert sh.kv.match_prefix(w + y + [9]) == sh.kv.tables[1][:1]
    assert sh.kv.match_prefix(x + y + [9]) == sh.kv.tables[0][:2]


def test_unreferenced_cached_blocks_are_evicted_least_recently_freed_first():
    sh = Shadow(4, 2)
    assert sh.add(0, [1, 2, 3])  # blocks: [1 2] [3 _]
    a = list(sh.kv.tables[0])
    sh.drop(0)  # tail first: the partial block is freed (and so handed out) before the full one
    assert sh.add(1, [5, 6, 7, 8, 9])  # 3 blocks: takes the 2 never-used blocks, then a[1]
    assert a[1] in sh.kv.tables[1] and a[0] not in sh.kv.tables[1]
    assert sh.kv.match_prefix([1, 2, 3]) == [a[0]]  # still cached
    sh.drop(1)
    assert sh.add(2, [0] * 8)  # needs all 4 blocks: the cached [1 2] is evicted
    assert sh.kv.match_prefix([1, 2, 3]) == []
    sh.verify()


def test_fork_copies_the_shared_partial_block_on_write_only():
    sh = Shadow(8, 4)
    assert sh.add(0, [1, 2, 3, 4, 5, 6])  # [1 2 3 4] [5 6 _ _]
    sh.kv.fork(0, 1)
    sh.tokens[1], sh.computed[1] = list(sh.tokens[0]), 6
    assert sh.kv.tables[1] == sh.kv.tables[0]
    sh.tokens[1] = sh.tokens[1] + [70]
    copies = sh.kv.allocate(1, 6, 7)
    assert copies is not None and len(copies) == 1 and copies[0][0] == sh.kv.tables[0][1]
    # undo through the shadow path for the remaining checks
    sh.kv.free(1)
    sh.kv.fork(0, 1)
    assert sh.write(1, 6, 7)
    sh.tokens[0] = sh.tokens[0] + [80]
    assert sh.write(0, 6, 7)  # parent's block now has ref 1: written in place
    assert sh.kv.tables[0][0] == sh.kv.tables[1][0] and sh.kv.tables[0][1] != sh.kv.tables[1][1]
    sh.verify()


def test_failed_allocation_changes_nothing_and_double_free_raises():
    sh = Shadow(2, 4)
    assert sh.add(0, [1, 2, 3, 4, 5])
    before = (dict(sh.kv.tables), list(sh.kv.pool.ref))
    assert sh.kv.allocate(0, 5, 13) is None  # needs a third block
    assert sh.kv.allocate(1, 0, 1) is None
    assert (dict(sh.kv.tables), list(sh.kv.pool.ref)) == before
    b = sh.kv.tables[0][0]
    sh.drop(0)
    with pytest.raises(SlimlmError, match="double free"):
        sh.kv.pool.release(b)


def test_budget_in_bytes():
    # 2 layers, 2 kv heads, head dim 8, 16-token blocks, fp32: 2 * 2 * 2 * 8 * 16 * 4 = 4096 bytes/block
    assert blocks_for_bytes(4096 * 10 + 1, 2, 2, 8, 16, 4) == 10
    with pytest.raises(SlimlmError, match="holds no block"):
        blocks_for_bytes(100, 2, 2, 8, 16, 4)


def test_salted_sequences_share_blocks_only_under_the_same_salt():
    """Multi-LoRA: equal tokens under different adapters (salts) have different KV, so never share."""
    kv = KVCacheManager(BlockPool(num_blocks=16, block_size=4))
    prompt = list(range(13))  # 3 full blocks + 1 token
    for sid, salt in ((1, None), (2, 7)):
        assert kv.match_prefix(prompt, salt) == []
        assert kv.allocate(sid, 0, 13, salt=salt) == []
        kv.commit(sid, prompt, 13)
    assert kv.match_prefix(prompt) == kv.tables[1][:3]
    assert kv.match_prefix(prompt, 7) == kv.tables[2][:3]
    assert kv.match_prefix(prompt, 8) == []
    kv.fork(2, 3)  # a fork keeps its parent's salt: its later full blocks join the parent's chain
    kv.allocate(3, 13, 17)
    kv.commit(3, prompt + [1, 2, 3, 4], 17)
    assert kv.match_prefix(prompt + [1, 2, 3, 4, 5], 7) == kv.tables[3][:4]
    assert kv.match_prefix(prompt + [1, 2, 3, 4, 5]) == kv.tables[1][:3]
    for sid in (1, 2, 3):
        kv.free(sid)
    assert kv.salts == {} and kv.pool.num_used == 0
    kv.check()
