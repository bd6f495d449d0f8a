"""Where speculative tokens come from: n-gram prompt lookup, a draft model, or the target itself with
layers skipped (self-speculation).

Every proposer answers ``propose([(seq, gamma), ...]) -> {seq_id: (tokens, q)}`` for running
sequences whose last token is not computed yet (a decode), with ``q: [len(tokens), V]`` the draft's
sampling distributions (``None``: a deterministic proposal, or a greedy request), and
``rollback(seq_id, valid)`` / ``release(seq_id)`` after verification / when the sequence leaves.

- :class:`NgramProposer`: the latest earlier occurrence of the last ``n`` tokens (``n`` from
  ``ngram_max`` down to ``ngram_min``) proposes the tokens that followed it. An index of every n-gram's
  latest end is kept per sequence and extended as tokens arrive (O(1) per step, not a scan).
- :class:`ModelProposer`: a small model with the target's vocabulary and its own paged KV (own block
  pool, no prefix caching). Each round catches the draft's cache up on the sequence's new tokens,
  then runs ``gamma - 1`` more batched one-token steps; rejected drafts' KV is rolled back
  (:meth:`KVCacheManager.truncate`). Self-speculation is the same with :class:`LayerSubset` of the
  target as the draft: the kept layers share the target's weights, not its KV.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Seq
from types import SimpleNamespace
from typing import Any

import torch

from slimlm.engine.block_pool import BlockPool, KVCacheManager
from slimlm.engine.runner import BatchEntry, ModelRunner
from slimlm.engine.sampling import probs
from slimlm.engine.sequence import Sequence

Proposal = dict[int, tuple[list[int], torch.Tensor | None]]


class NgramProposer:
    """Prompt lookup: no model, the sequence's own history proposes."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1):
        self.nmax, self.nmin = ngram_max, ngram_min

    def propose(self, items: Seq[tuple[Sequence, int]]) -> Proposal:
        out: Proposal = {}
        for seq, gamma in items:
            toks = self._lookup(seq, gamma)
            if toks:
                out[seq.seq_id] = (toks, None)
        return out

    def _lookup(self, seq: Sequence, gamma: int) -> list[int]:
        tokens = seq.tokens
        length = len(tokens)
        done, index = seq.state.setdefault("ngram", (dict.fromkeys(range(self.nmin, self.nmax + 1), 0),
                                                     {n: {} for n in range(self.nmin, self.nmax + 1)}))
        for n in range(self.nmax, self.nmin - 1, -1):
            if length < n + 1:
                continue
            idx = index[n]
            for j in range(max(done[n], n - 1), length - 1):  # n-grams ending before the last token
                idx[tuple(tokens[j - n + 1:j + 1])] = j
            done[n] = max(done[n], length - 1)
            j = idx.get(tuple(tokens[length - n:]))
            if j is not None:
                return list(tokens[j + 1:j + 1 + gamma])
        return []

    def rollback(self, seq_id: int, valid: int) -> None:
        """Nothing to undo: the index only holds accepted tokens."""

    def release(self, seq_id: int) -> None:
        """The index lives in the sequence's state."""


class LayerSubset:
    """The target with only the decoder layers ``keep`` (what :class:`ModelRunner` needs of a model)."""

    def __init__(self, target: Any, keep: Seq[int]):
        self.config, self.dtype = target.config, target.dtype
        self.embed, self.head, self.rope_tables = target.embed, target.head, target.rope_tables
        self.model = SimpleNamespace(layers=[target.model.layers[i] for i in keep])
        self.keep = list(keep)


def self_draft_layers(num_layers: int, keep_fraction: float) -> list[int]:
    """Evenly spaced layers to keep (the first and the last among them when 2 or more are kept)."""
    n = max(1, min(num_layers, round(num_layers * keep_fraction)))
    if n == 1:
        return [0]
    return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})


class ModelProposer:
    """A draft model (or a layer subset of the target) proposing ``gamma`` tokens per sequence."""

    def __init__(self, model: Any, num_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        # k/v of layers a LayerSubset skips are zero pages that are never touched
        self.runner = ModelRunner(model, num_blocks, block_size, dtype)
        self.kv = KVCacheManager(BlockPool(num_blocks, block_size, prefix_caching=False))
        self.max_len = model.config.max_position_embeddings
        self.done: dict[int, int] = {}  # seq_id -> tokens whose draft KV is computed
        self.last_seconds = 0.0  # wall time of the last propose (cost model)
        self.last_rounds = 0  # batched draft forwards in it

    def _pick(self, seq: Sequence, logits: torch.Tensor) -> tuple[int, torch.Tensor | None]:
        """logits: [V] -> the draft token and, for a sampled request, the distribution it came from."""
        if seq.params.greedy:
            return int(logits.argmax()), None
        q = probs(logits.unsqueeze(0), seq.params)[0]
        return int(torch.multinomial(q, 1, generator=seq.state.get("gen"))), q

    def propose(self, items: Seq[tuple[Sequence, int]]) -> Proposal:
        t0 = time.perf_counter()
        active: list[tuple[Sequence, int]] = []
        entries: list[BatchEntry] = []
        for seq, gamma in items:
            length = seq.num_tokens
            gamma = min(gamma, self.max_len - length)
            if gamma < 1:
                continue
            dc = min(self.done.get(seq.seq_id, 0), length - 1)
            if seq.seq_id in self.kv.tables:
                self.kv.truncate(seq.seq_id, dc)
            if self.kv.allocate(seq.seq_id, dc, length + gamma - 1) is None:
                continue  # the draft's pool is full: this sequence decodes plainly this step
            active.append((seq, gamma))
            entries.append(BatchEntry(self.kv.tables[seq.seq_id], dc, seq.tokens[dc:length]))
        drafts: dict[int, list[int]] = {s.seq_id: [] for s, _ in active}
        qs: dict[int, list[torch.Tensor]] = {s.seq_id: [] for s, _ in active}
        rounds = 0
        j = 0
        while entries:
            logits = self.runner.forward(entries)  # [n, V]
            rounds += 1
            nxt_active, nxt_entries = [], []
            for i, (seq, gamma) in enumerate(active):
                t, q = self._pick(seq, logits[i])
                drafts[seq.seq_id].append(t)
                if q is not None:
                    qs[seq.seq_id].append(q)
                if j + 1 < gamma:
                    nxt_active.append((seq, gamma))
                    nxt_entries.append(BatchEntry(self.kv.tables[seq.seq_id], seq.num_tokens + j, [t]))
            active, entries = nxt_active, nxt_entries
            j += 1
        self.last_seconds, self.last_rounds = time.perf_counter() - t0, rounds
        out: Proposal = {}
        for seq, _ in items:
            d = drafts.get(seq.seq_id)
            if d:
                self.done[seq.seq_id] = seq.num_tokens + len(d) - 1
                out[seq.seq_id] = (d, torch.stack(qs[seq.seq_id]) if qs[seq.seq_id] else None)
        return out

    def rollback(self, seq_id: int, valid: int) -> None:
        """Only the first ``valid`` tokens' draft KV is still right (the rest were rejected)."""
        if seq_id in self.done:
            self.done[seq_id] = min(self.done[seq_id], valid)
            self.kv.truncate(seq_id, self.done[seq_id])

    def release(self, seq_id: int) -> None:
        self.kv.free(seq_id)
        self.done.pop(seq_id, None)
