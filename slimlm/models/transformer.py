"""The slimlm decoder: one compact implementation for every supported family.

Forward for training (full causal attention, optional padding mask) and for inference through a
preallocated :class:`KVCache`. Positions are explicit (``positions: [B, T]``) so ragged batches can
be left-padded; the calibration driver reuses :meth:`Transformer.embed` / :meth:`Transformer.context`
to stream hidden states through one layer at a time.

Example::

    from slimlm.loaders import load_model
    lm = load_model("smollm2-135m")
    logits = lm.model(torch.tensor([lm.tokenizer.encode("Hello")]))  # [1, T, vocab]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimlm.models.config import ModelConfig
from slimlm.models.kv_cache import KVCache, SequenceCache
from slimlm.models.layers import AttnContext, DecoderLayer, Norm, linear
from slimlm.models.rope import RotaryCache


def _embedding(rows: int, dim: int, padding_idx: int | None = None) -> nn.Embedding:
    """An embedding without random init (the loader assigns its weight): on the meta device the init
    would import torch's symbolic-shape machinery (sympy, ~75 MB resident) into every process that loads."""
    return nn.Embedding(rows, dim, padding_idx=padding_idx, _weight=torch.empty(rows, dim))


class DecoderStack(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # transformers gives the pad token's row no gradient from the lookup (GPT-2 sets no padding_idx)
        pad = cfg.pad_token_id
        padding_idx = pad if cfg.family != "gpt2" and isinstance(pad, int) and 0 <= pad < cfg.vocab_size else None
        self.embed_tokens = _embedding(cfg.vocab_size, cfg.hidden_size, padding_idx)
        if cfg.learned_pos:
            self.embed_positions = _embedding(cfg.max_position_embeddings + cfg.pos_offset, cfg.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = Norm(cfg.hidden_size, cfg.norm, cfg.norm_eps, cfg.norm_offset, cfg.norm_bias)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderStack(cfg)
        self.lm_head: nn.Module = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._rope: dict[str, RotaryCache] = {}
        self._rope_dtype: torch.dtype | None = None
        self.gradient_checkpointing = False  # the trainer's activation checkpointing, per decoder layer

    def ties_lm_head(self) -> bool:
        """Whether ``lm_head`` shares the embedding matrix: a tied config whose head is still a plain
        linear (a swapped, e.g. quantized, head holds its own tensors and is saved with them)."""
        return self.config.tie_word_embeddings and type(self.lm_head) is nn.Linear

    # --- pieces reused by the calibration driver -----------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor, prefix: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, T], positions: [B, P + T] -> hidden states [B, P + T, D].

        ``prefix: [B, P, D]`` are token embeddings put before the tokens' (prompt tuning's virtual
        tokens: not scaled like looked-up ones, but given positions like every token, as transformers
        treats ``inputs_embeds``)."""
        h = self.model.embed_tokens(input_ids)
        cfg = self.config
        if cfg.embed_scale != 1.0:
            h = h * torch.tensor(cfg.embed_scale, dtype=h.dtype)
        if prefix is not None:
            h = torch.cat([prefix.to(h.dtype), h], dim=1)
        if cfg.learned_pos:
            h = h + self.model.embed_positions(positions + cfg.pos_offset)
        return h

    def _rotary(self, layer_type: str) -> RotaryCache | None:
        cfg = self.config
        if cfg.rope is None:
            return None
        if self._rope_dtype != self.dtype:
            self._rope, self._rope_dtype = {}, self.dtype
        key = "sliding_attention" if layer_type == "sliding_attention" and cfg.rope_local is not None else "full_attention"
        if key not in self._rope:
            params = cfg.rope_local if key == "sliding_attention" and cfg.rope_local is not None else cfg.rope
            assert params is not None
            self._rope[key] = RotaryCache(params, cfg.head_dim, self.dtype)
        return self._rope[key]

    def context(self, positions: torch.Tensor, cache: KVCache | SequenceCache | None = None,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> AttnContext:
        """Rotary tables and masks for a forward over ``positions: [B, T]``.

        ``attention_mask: [B, S]`` (1 = real token) covers every key, cached ones included.
        ``segment_ids: [B, T]`` (packed training sequences, no cache): a query attends only to keys
        of its own segment, so packed examples never see each other (their positions restart too).
        """
        cfg = self.config
        b, t = positions.shape
        past = cache.length if cache is not None else 0
        s = past + t
        types = set(cfg.layer_types) or {"full_attention"}
        rope = self.rope_tables(positions)
        padded = attention_mask is not None and not bool(attention_mask.all())
        if segment_ids is not None and cache is not None:
            raise ValueError("segment_ids (packed sequences) are for cache-free training forwards")
        masks: dict[str, torch.Tensor | None] = {}
        for lt in types:
            window = cfg.sliding_window if lt == "sliding_attention" else None
            need_window = window is not None and s > window
            if not padded and not need_window and segment_ids is None and (t == 1 or past == 0):
                masks[lt] = None  # decode step: every key; fresh prefill: SDPA's causal flag
                continue
            q_idx = torch.arange(past, s).unsqueeze(1)  # [T, 1]
            k_idx = torch.arange(s).unsqueeze(0)  # [1, S]
            m = k_idx <= q_idx
            if need_window:
                assert window is not None
                m = m & (q_idx - k_idx < window)
            m = m.view(1, 1, t, s)
            if padded:
                assert attention_mask is not None
                m = m & attention_mask.bool().view(b, 1, 1, s)
                # a padding query would attend to nothing (NaN that leaks through 0 * NaN in later
                # layers): let every query see its own slot
                m = m | (k_idx == q_idx).view(1, 1, t, s)
            if segment_ids is not None:  # block-diagonal: [B, 1, T, 1] == [B, 1, 1, T]
                m = m & (segment_ids.view(b, 1, t, 1) == segment_ids.view(b, 1, 1, t))
            masks[lt] = m
        is_causal = past == 0 and not padded and segment_ids is None
        return AttnContext(rope=rope, masks=masks, is_causal=is_causal, cache=cache)

    def rope_tables(self, positions: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Layer type -> rotary (cos, sin) ``[B, T, 1, Dh]`` for ``positions: [B, T]`` (empty without RoPE)."""
        rope: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for lt in set(self.config.layer_types) or {"full_attention"}:
            rc = self._rotary(lt)
            if rc is not None:
                cos, sin = rc.lookup(positions)  # [B, T, Dh]
                rope[lt] = (cos.unsqueeze(2), sin.unsqueeze(2))  # [B, T, 1, Dh]
        return rope

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + lm_head (+ Gemma's final soft-capping): [B, T, D] -> [B, T, V]."""
        logits = linear(self.lm_head, self.model.norm(h))
        cap = self.config.final_logit_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # --- forward -------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: KVCache | SequenceCache | None = None,
                attention_mask: torch.Tensor | None = None, last_only: bool = False,
                segment_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids: [B, T] -> logits [B, T, V] (or [B, 1, V] with ``last_only``).

        ``labels: [B, T]`` (training): return the next-token cross-entropy *summed* over the counted
        targets (``-100`` skipped) instead of the logits, computed by :meth:`lm_loss_sum` without
        ever holding the whole ``[B, T, V]`` logits.

        ``segment_ids: [B, T]`` marks packed sequences (see :meth:`context`; give their restarting
        ``positions`` too). With ``gradient_checkpointing`` set, a forward with grad enabled keeps
        only each decoder layer's input and recomputes the layer in backward (activation memory).

        With a ``prompt_encoder`` submodule (prompt tuning, ``slimlm.peft``) a fresh forward (no cache
        history) runs its P virtual tokens first: logits [B, P + T, V], as peft returns them."""
        b, t = input_ids.shape
        prefix = None
        enc = self._modules.get("prompt_encoder")
        if enc is not None and (cache is None or cache.length == 0):
            if positions is not None:
                raise ValueError("explicit positions cannot be combined with a prompt encoder")
            prefix = enc(b)  # [B, P, D]
            t += prefix.shape[1]
            if attention_mask is not None:
                attention_mask = torch.cat([attention_mask.new_ones(b, prefix.shape[1]), attention_mask], dim=1)
        if positions is None:
            positions = default_positions(b, t, cache.length if cache is not None else 0, attention_mask)
        ctx = self.context(positions, cache, attention_mask, segment_ids)
        h = self.embed(input_ids, positions, prefix)
        if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
            from torch.utils.checkpoint import checkpoint  # imported on use: inference never needs it

            for layer in self.model.layers:
                h = checkpoint(layer, h, ctx, use_reentrant=False)
        else:
            for layer in self.model.layers:
                h = layer(h, ctx)
        if cache is not None:
            cache.advance(t)
        if labels is not None:
            return self.lm_loss_sum(h[:, h.shape[1] - labels.shape[1]:], labels)  # prompt tuning: drop P
        if last_only:
            h = h[:, -1:]
        return self.head(h)

    def lm_loss_sum(self, h: torch.Tensor, labels: torch.Tensor, chunk_bytes: int = 64 * 2**20) -> torch.Tensor:
        """Summed next-token cross-entropy of hidden states ``h: [B, T, D]`` against ``labels: [B, T]``.

        Why: the logits of a training batch and what autograd keeps for them (the fp32 logits, their
        log-softmax, then two gradients of the same size) are ``~5 B T V`` floats: 2 GB at 4 x 512
        tokens of a 49k vocabulary, more than the whole model. Here only rows with a counted target
        reach the head, in chunks of ``chunk_bytes`` of logits, each under activation checkpointing:
        one chunk's logits exist at a time, in forward and again (recomputed) in backward. Same
        value and gradients as ``cross_entropy(head(h)[:, :-1], labels[:, 1:], reduction="sum")``
        up to the summation order (tested)."""
        from torch.utils.checkpoint import checkpoint  # imported on use: inference never needs it

        d = h.shape[-1]
        y = labels[:, 1:].reshape(-1)  # [N] targets of positions 0..T-2
        keep = (y != -100).nonzero().squeeze(1)
        x = h[:, :-1].reshape(-1, d).index_select(0, keep)  # [n, D] rows that count
        y = y.index_select(0, keep)
        if x.shape[0] == 0:
            return h.sum() * 0.0  # nothing counted: a zero that still reaches the graph
        rows = max(1, chunk_bytes // (4 * self.config.vocab_size))
        total = h.new_zeros((), dtype=torch.float32)
        for i in range(0, x.shape[0], rows):
            xi, yi = x[i:i + rows], y[i:i + rows]
            if torch.is_grad_enabled():
                total = total + checkpoint(self._chunk_loss, xi, yi, use_reentrant=False)
            else:
                total = total + self._chunk_loss(xi, yi)
        return total

    def _chunk_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: [n, D], y: [n] -> summed cross-entropy of ``head(x)`` (fp32 log-softmax)."""
        return F.cross_entropy(self.head(x).float(), y, reduction="sum")

    def unfuse_projections_(self) -> None:
        """Drop the inference fusion and cached decode plans now, not at the next call (they hold the
        concatenated weights: a caller that swapped the weights frees the old ones at once)."""
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            layer.self_attn._fusion = layer.mlp._fusion = None
            layer.__dict__.pop("_plan", None)

    def fuse_projections_(self) -> int:
        """Fuse q/k/v and gate/up matmuls of plain linears for inference; returns how many were fused."""
        n = 0
        for layer in self.model.layers:
            assert isinstance(layer, DecoderLayer)
            n += int(layer.self_attn.fuse_()) + int(layer.mlp.fuse_())
        return n

    def num_parameters(self) -> int:
        seen: set[int] = set()
        n = 0
        for t in list(self.parameters()) + list(self.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                n += t.numel()
        return n


def default_positions(b: int, t: int, past: int, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Positions [B, T]: counted over real tokens when a (left-)padding mask is given."""
    if attention_mask is None:
        return (torch.arange(past, past + t)).unsqueeze(0).expand(b, t)
    pos = attention_mask.long().cumsum(-1) - 1  # [B, S]
    return pos[:, -t:].clamp(min=0)
