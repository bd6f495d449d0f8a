"""Paged KV memory as plain data: a pool of fixed-size blocks and per-sequence block tables.

Why: a contiguous max-length cache per request wastes most of its memory and cannot share a system
prompt between requests. Here the KV of a sequence lives in blocks of ``block_size`` tokens (16 by
default) named by integer ids; a sequence's *block table* lists its blocks in order, so token ``i``
sits in slot ``table[i // block_size] * block_size + i % block_size`` of the cache tensors
(:class:`slimlm.engine.paged_cache.PagedKVCache`). Nothing here touches a tensor: the allocator is
unit-tested without a model (tests/engine/test_block_pool.py).

- Reference counts: a block shared by several sequences (a forked sequence, a cached prefix) is
  freed when its last user releases it; releasing a free block raises (no silent double free).
- Copy-on-write: :meth:`KVCacheManager.fork` shares every block of the parent. Full blocks are never
  written again (the cache is append-only), so only a shared, partly filled last block is copied,
  on the first write into it; :meth:`KVCacheManager.allocate` returns the ``(src, dst)`` block copies
  the cache must run before the forward.
- Prefix caching: once a block is full and its KV computed, it gets a hash chained with its parent
  block's hash (``hash((parent_hash, tokens))``), so equal hashes mean equal token prefixes (up to a
  64-bit collision of the chain; the block's own tokens are compared exactly). A later sequence whose
  prompt starts with the same full blocks reuses those block ids instead of recomputing them. A block
  whose reference count drops to 0 keeps its hash and stays in the free queue: it is handed out again
  (evicting its hash) only when it reaches the front, so unreferenced cached blocks are evicted in
  least-recently-freed (LRU) order. A sequence's blocks are freed tail first, so a shared prefix
  outlives its suffixes.
- A sequence may carry a ``salt`` (the LoRA adapter it runs, say): the chain of its blocks starts
  from the salt instead of ``None``, so equal tokens under different adapters (different KV) never
  share a block.

Example::

    kv = KVCacheManager(BlockPool(num_blocks=64, block_size=16))
    prompt = list(range(40))
    kv.allocate(1, 0, len(prompt), kv.match_prefix(prompt))   # 3 blocks, no copies
    kv.commit(1, prompt, 40)                                  # blocks 0-1 are full: cached
    hit = kv.match_prefix(prompt + [7])                       # the same 2 block ids
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from slimlm.utils.errors import SlimlmError


def block_hash(parent: int | None, tokens: Sequence[int]) -> int:
    """Hash of a full block: its tokens chained with the hash of the block before it."""
    return hash((parent, tuple(tokens)))


def full_block_hashes(token_ids: Sequence[int], block_size: int, known: list[int] | None = None) -> list[int]:
    """Chained hashes of every full block of ``token_ids``; ``known`` (a prefix of the answer) is extended."""
    out = list(known) if known else []
    for i in range(len(out), len(token_ids) // block_size):
        out.append(block_hash(out[-1] if out else None, token_ids[i * block_size:(i + 1) * block_size]))
    return out


def blocks_for_bytes(budget_bytes: float, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                     element_size: int) -> int:
    """How many blocks fit in ``budget_bytes`` of K plus V over all layers (a GiB budget * 2**30)."""
    per_block = 2 * num_layers * num_kv_heads * head_dim * block_size * element_size
    n = int(budget_bytes // per_block)
    if n < 1:
        raise SlimlmError(f"a KV budget of {budget_bytes / 2**30:.4g} GiB holds no block of {per_block} bytes")
    return n


class BlockPool:
    """``num_blocks`` block ids with reference counts, a free queue in LRU order and the prefix-hash map."""

    def __init__(self, num_blocks: int, block_size: int = 16, prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise SlimlmError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks, self.block_size, self.prefix_caching = num_blocks, block_size, prefix_caching
        self.ref = [0] * num_blocks
        self.hash: list[int | None] = [None] * num_blocks  # hash of a full, computed block (cached)
        self.tokens: list[tuple[int, ...] | None] = [None] * num_blocks  # its tokens (exact check)
        self.free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))  # front = evict first
        self.cached: dict[int, int] = {}  # hash -> block id

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, including unreferenced cached ones)."""
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self) -> int:
        """A fresh block (ref 1): the least recently freed one; its cached hash, if any, is evicted."""
        if not self.free:
            raise SlimlmError("KV block pool exhausted")
        b, _ = self.free.popitem(last=False)
        self._forget(b)
        self.ref[b] = 1
        return b

    def share(self, b: int) -> None:
        """One more user of block ``b`` (taking it out of the free queue if it was unreferenced)."""
        if self.ref[b] == 0:
            del self.free[b]
        self.ref[b] += 1

    def release(self, b: int) -> None:
        """One user fewer; at 0 the block joins the back of the free queue (keeping its hash)."""
        if self.ref[b] <= 0:
            raise SlimlmError(f"block {b} released while free (double free)")
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if not self.prefix_caching:
                self._forget(b)
            self.free[b] = None

    def lookup(self, h: int, tokens: Sequence[int]) -> int | None:
        """The cached block holding exactly ``tokens`` under hash ``h``, or ``None``."""
        b = self.cached.get(h)
        if b is None or self.tokens[b] != tuple(tokens):
            return None
        return b

    def register(self, b: int, h: int, tokens: Sequence[int]) -> None:
        """Mark a full, computed block as cached under ``h`` (kept if another block holds ``h`` already)."""
        if not self.prefix_caching or self.hash[b] is not None or h in self.cached:
            return
        self.hash[b], self.tokens[b] = h, tuple(tokens)
        self.cached[h] = b

    def _forget(self, b: int) -> None:
        h = self.hash[b]
        if h is not None:
            del self.cached[h]
            self.hash[b] = self.tokens[b] = None

    def reset_prefix_cache(self) -> None:
        """Drop every cached hash of unreferenced blocks (e.g. after the weights changed)."""
        for b in list(self.free):
            self._forget(b)

    def check(self) -> None:
        """Raise ``AssertionError`` if the pool's invariants do not hold (for tests)."""
        assert all(r >= 0 for r in self.ref), "negative reference count"
        assert set(self.free) == {b for b in range(self.num_blocks) if self.ref[b] == 0}, "free queue != ref 0"
        assert all(self.hash[b] == h for h, b in self.cached.items()), "hash map out of sync"
        assert sum(h is not None for h in self.hash) == len(self.cached), "stale block hash"


class KVCacheManager:
    """Block tables of the running sequences over one :class:`BlockPool` (what the scheduler calls).

    A sequence's table covers ``len(table) * block_size`` token slots; ``hashes[seq]`` holds the
    chained hashes of its full blocks whose KV is computed (registered in the pool's prefix cache).
    """

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self.block_size = pool.block_size
        self.tables: dict[int, list[int]] = {}
        self.hashes: dict[int, list[int]] = {}
        self.salts: dict[int, int] = {}  # the hash-chain root of a salted sequence

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, token_ids: Sequence[int], salt: int | None = None) -> list[int]:
        """Block ids of the longest cached prefix of full blocks of ``token_ids`` (under ``salt``), leaving
        at least one token to compute (its logits give the next token). References are not taken yet."""
        if not self.pool.prefix_caching:
            return []
        bs = self.block_size
        out: list[int] = []
        parent: int | None = salt
        for i in range((len(token_ids) - 1) // bs):
            toks = token_ids[i * bs:(i + 1) * bs]
            h = block_hash(parent, toks)
            b = self.pool.lookup(h, toks)
            if b is None:
                break
            out.append(b)
            parent = h
        return out

    def blocks_needed(self, seq_id: int, start: int, end: int, prefix: Sequence[int] = ()) -> int:
        """Free blocks an :meth:`allocate` of slots ``[start, end)`` would take from the pool."""
        table = self.tables.get(seq_id)
        if table is None:
            # adopting unreferenced cached blocks takes them out of the free queue too
            have = len(prefix)
            return self.blocks_for(end) - have + sum(self.pool.ref[b] == 0 for b in prefix)
        need = max(0, self.blocks_for(end) - len(table))
        need += sum(self.pool.ref[b] > 1 for b in table[start // self.block_size:self.blocks_for(end)])
        return need

    def allocate(self, seq_id: int, start: int, end: int, prefix: Sequence[int] = (),
                 salt: int | None = None) -> list[tuple[int, int]] | None:
        """Make token slots ``[start, end)`` of ``seq_id`` writable; ``None`` (nothing changed) if the pool
        lacks blocks. A new sequence first adopts the cached ``prefix`` blocks (from :meth:`match_prefix`
        with the same ``salt``, which its blocks' hashes start from).
        Returns the copy-on-write block copies ``(src, dst)`` to run before writing."""
        if self.blocks_needed(seq_id, start, end, prefix) > self.pool.num_free:
            return None
        table = self.tables.get(seq_id)
        if table is None:
            if start != len(prefix) * self.block_size:
                raise SlimlmError(f"sequence {seq_id}: first write at {start}, but {len(prefix)} cached blocks")
            table = self.tables[seq_id] = []
            self.hashes[seq_id] = []
            if salt is not None:
                self.salts[seq_id] = salt
            for b in prefix:
                self.pool.share(b)
                table.append(b)
                self.hashes[seq_id].append(self.pool.hash[b])  # type: ignore[arg-type]
        elif start > len(table) * self.block_size:
            raise SlimlmError(f"sequence {seq_id}: write at {start} past its {len(table)} blocks")
        copies = []
        for i in range(start // self.block_size, min(len(table), self.blocks_for(end))):
            if self.pool.ref[table[i]] > 1:  # shared with a fork: copy before the first write
                dst = self.pool.allocate()
                copies.append((table[i], dst))
                self.pool.release(table[i])
                table[i] = dst
        while len(table) < self.blocks_for(end):
            table.append(self.pool.allocate())
        return copies

    def commit(self, seq_id: int, token_ids: Sequence[int], num_computed: int) -> None:
        """After a forward: the first ``num_computed`` tokens of ``token_ids`` have their KV in the cache;
        register the blocks that became full in the prefix cache."""
        table, hashes = self.tables[seq_id], self.hashes[seq_id]
        bs = self.block_size
        for i in range(len(hashes), min(num_computed // bs, len(table))):
            toks = token_ids[i * bs:(i + 1) * bs]
            h = block_hash(hashes[-1] if hashes else self.salts.get(seq_id), toks)
            hashes.append(h)
            self.pool.register(table[i], h, toks)

    def fork(self, parent: int, child: int) -> None:
        """``child`` shares all of ``parent``'s blocks (e.g. ``n`` samples of one prompt)."""
        if child in self.tables:
            raise SlimlmError(f"sequence {child} already has blocks")
        table = self.tables[parent]
        for b in table:
            self.pool.share(b)
        self.tables[child] = list(table)
        self.hashes[child] = list(self.hashes[parent])
        if parent in self.salts:
            self.salts[child] = self.salts[parent]

    def free(self, seq_id: int) -> None:
        """Release every block of ``seq_id`` (tail first, so shared prefixes are evicted last)."""
        table = self.tables.pop(seq_id, None)
        self.hashes.pop(seq_id, None)
        self.salts.pop(seq_id, None)
        for b in reversed(table or []):
            self.pool.release(b)

    def truncate(self, seq_id: int, num_tokens: int) -> None:
        """Keep only the blocks holding token slots ``[0, num_tokens)`` of ``seq_id`` (speculative
        rollback: the KV of rejected draft tokens is dropped; their slots in a kept block are
        overwritten by the next write, and only blocks full of computed tokens are ever cached)."""
        table = self.tables[seq_id]
        keep = self.blocks_for(num_tokens)
        while len(table) > keep:
            self.pool.release(table.pop())
        del self.hashes[seq_id][keep:]

    def slot(self, seq_id: int, pos: int) -> int:
        """Cache slot of token ``pos`` of ``seq_id``."""
        return self.tables[seq_id][pos // self.block_size] * self.block_size + pos % self.block_size

    def check(self) -> None:
        """Pool invariants plus: every block's reference count equals the number of tables holding it."""
        self.pool.check()
        count = [0] * self.pool.num_blocks
        for table in self.tables.values():
            for b in table:
                count[b] += 1
        assert count == self.pool.ref, "reference counts != table memberships"
