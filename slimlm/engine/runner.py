"""Model runner: executes one scheduled step (a ragged batch) on the model through a PagedKVCache.

Why: every sequence's new tokens of a step (a decode's 1 token, a prefill chunk's many) are flattened
into one input row ``[1, N]`` with per-token positions, so each linear runs one ``[N, D]`` GEMM for
the whole batch (B decode streams are one GEMM-shaped call, not B GEMVs) and only attention is per
sequence (:class:`slimlm.engine.paged_cache.PagedKVCache`). Logits are computed only for the last
token of the sequences that sample this step. Entries naming a LoRA adapter run it on their tokens
(:mod:`slimlm.peft.serving`: the base matmuls stay one call for the whole mixed batch).

Example::

    runner = ModelRunner(lm.model, num_blocks=64, block_size=16)
    logits = runner.forward([BatchEntry(table=[0, 1], start=0, tokens=prompt)])  # [1, V] float32
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from slimlm import kernels
from slimlm.engine.paged_cache import Int8PagedKVCache, PagedKVCache
from slimlm.models.kv_policy import KVPolicy
from slimlm.models.layers import AttnContext
from slimlm.models.transformer import Transformer
from slimlm.peft.serving import MultiLora
from slimlm.utils.errors import SlimlmError


@dataclass
class BatchEntry:
    """One sequence in a step: its block table, tokens already cached, the new tokens to run."""

    table: Sequence[int]
    start: int
    tokens: Sequence[int]
    logits: bool = True  # return the last new token's logits (False: a prefill chunk that is not the last)
    num_logits: int = 1  # how many of the last new tokens return logits (speculative verification: 1 + drafts)
    adapter: str | None = None  # the LoRA adapter its tokens run (multi-LoRA serving; None: the base model)


PAGED_POLICIES = ("full", "int8")  # what the paged engine can serve (see docs/serving.md)


def paged_cache_class(policy: KVPolicy | None) -> type[PagedKVCache]:
    """The paged cache of a server-wide KV policy; SlimlmError naming what is supported otherwise."""
    method = policy.method if policy is not None else "full"
    if method not in PAGED_POLICIES:
        raise SlimlmError(f"the serving engine supports --kv-policy {' or '.join(PAGED_POLICIES)}, not {policy} "
                          "(int4 and streaming run in `slimlm generate` / `slimlm eval`)")
    return Int8PagedKVCache if method == "int8" else PagedKVCache


def kv_bytes_per_token(config, policy: KVPolicy | None, element_size: int) -> int:  # type: ignore[no-untyped-def]
    """K + V bytes per token over all layers in the paged cache of ``policy``."""
    c = config
    if paged_cache_class(policy) is Int8PagedKVCache:
        return Int8PagedKVCache.bytes_per_token(c.num_hidden_layers, c.num_key_value_heads, c.head_dim)
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * element_size


class ModelRunner:
    """Owns the paged KV tensors of one model; ``forward`` runs a step given block tables."""

    def __init__(self, model: Transformer, num_blocks: int, block_size: int = 16, dtype: torch.dtype | None = None,
                 kv_policy: KVPolicy | None = None):
        self.model = model
        cls = paged_cache_class(kv_policy)
        self.cache = cls.for_model(model.config, num_blocks, block_size, dtype or model.dtype)
        rope = model.config.rope
        self._dynamic_rope = rope is not None and rope.get("rope_type") == "dynamic"
        self.lora: MultiLora | None = None  # resident LoRA adapters, made by the engine's first add_adapter

    def _rope(self, entries: Sequence[BatchEntry], positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Rotary tables [1, N, 1, D] per layer type. Dynamic NTK frequencies depend on a sequence's
        own length, so each sequence looks its tables up alone."""
        if not self._dynamic_rope or len(entries) == 1:
            return self.model.rope_tables(positions)
        parts: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []
        off = 0
        for e in entries:
            parts.append(self.model.rope_tables(positions[:, off:off + len(e.tokens)]))
            off += len(e.tokens)
        return {lt: (torch.cat([p[lt][0] for p in parts], 1), torch.cat([p[lt][1] for p in parts], 1))
                for lt in parts[0]}

    @torch.inference_mode()
    def forward(self, entries: Sequence[BatchEntry], copies: Sequence[tuple[int, int]] = ()) -> torch.Tensor:
        """Run the step; block ``copies`` (copy-on-write) first. Returns float32 logits ``[n, V]`` for
        the last ``num_logits`` tokens of each entry with ``logits=True``, in order."""
        model = self.model
        self.cache.copy_blocks(copies)
        ids = torch.tensor([t for e in entries for t in e.tokens], dtype=torch.long).unsqueeze(0)  # [1, N]
        positions = torch.cat([torch.arange(e.start, e.start + len(e.tokens)) for e in entries]).unsqueeze(0)
        self.cache.set_batch([(e.table, e.start, len(e.tokens)) for e in entries])
        ctx = AttnContext(rope=self._rope(entries, positions), masks={}, is_causal=False, cache=self.cache)
        choice: AbstractContextManager[None] = nullcontext()
        if self.lora is not None and any(e.adapter is not None for e in entries):
            choice = self.lora.select([e.adapter for e in entries for _ in e.tokens])  # one per token of [1, N]
        ends: list[int] = []
        off = 0
        for e in entries:
            off += len(e.tokens)
            if e.logits:
                ends.extend(range(off - e.num_logits, off))
        with choice, kernels.batched_rows():  # a step's rows (B decodes + chunks) stay on GGUF's int-dot kernel
            h = model.embed(ids, positions)  # [1, N, D]
            for layer in model.model.layers:
                h = layer(h, ctx)
            if not ends:
                return torch.zeros(0, model.config.vocab_size)
            return model.head(h[:, ends])[0].float()  # [n, V]
