"""Memory terms besides the weights: KV cache, activations, gradients, optimizer states, calibration.

Every function is pure arithmetic on a :class:`~slimlm.plan.shapes.ModelShape` and says what it counts.
Element sizes: ``fp32`` 4, ``bf16``/``fp16`` 2, ``fp8`` 1.

- KV cache: contiguous (``slimlm generate``: ``[layers, B, H_kv, T, D]`` for K and V) or paged
  (``slimlm serve``: the engine allocates its whole pool of ``kv_budget_gib`` up front, zero-filled,
  so the pool is resident however few streams run; the streams need whole blocks of ``block_size``
  tokens each, and the plan says how many streams of the context the pool holds).
- Inference activations: the transient peak of one prefill forward (one layer's tensors at a time
  plus the last-position logits); attention via SDPA's fused CPU kernel (no ``T x T`` matrix).
- Training activations: what autograd keeps per layer and token (inputs of every linear, norm and
  activation; the attention output and log-sum-exp; the float copy SDPA makes of a packed batch's
  mask), all layers unless checkpointing keeps only each layer's input and recomputes one layer; plus
  one chunk of the chunked loss's logits (the trainer never holds ``[B, T, V]``). Checked against
  the tensors autograd really saves (``saved_tensors_hooks``, tests/plan/test_memory.py). The
  measured peak RSS of a training run is higher than these live bytes: glibc's heap keeps freed
  activation memory (its dynamic mmap threshold): ~2 GB at 4 x 512 tokens on SmolLM2 (AMD EPYC AVX2,
  2 threads); ``MALLOC_MMAP_THRESHOLD_=131072`` made the same run peak 29% lower and run 1.5x slower.
- Optimizer states, bytes per trainable parameter (fp32 states): ``adamw`` 8 (m, v), ``lion`` 4 (m),
  ``adamw8bit`` 2 (block-wise int8 m, v, fp32 absmax per 2048), ``adafactor`` factored second moment
  (``4 (rows + cols)`` per matrix, no first moment), ``came`` 4 per value (m) + two factored moments,
  ``lomo`` 0 (the update is fused into backward, so only one parameter's gradient exists at a time),
  ``galore`` rank-r projector ``4 m r`` + Adam on the projected ``r x n`` gradient (``8 r n``) per
  matrix (``m <= n``), vectors plain Adam.
- Load transient: ``load_model`` on a float checkpoint (HF folder, slimlm folder, GGUF de-quantized)
  fuses q|k|v and gate|up into one concatenated tensor each (``Transformer.fuse_projections_``)
  while the checkpoint's separate tensors are still referenced, so those bytes exist twice at the
  load's peak; a model dtype other than the checkpoint's (bf16 from a GGUF de-quantized to fp32)
  also keeps the checkpoint's float copy of every weight alive beside the converted one. Measured on
  SmolLM2-135M (2 threads): fp32 load peak 1035 MiB = residue 228 + weights 513 + fused 266 + 28
  (tokenizer, metadata); bf16 1159 = 228 + 257 + fp32 copy 513 + fused 133 + 28. The peak of a
  short run is this load, not the prefill (fp32 at context 256: 763 MiB predicted without the term).
- Calibration (GPTQ through :func:`slimlm.calib.driver.run_layerwise`): the dense fp32 model, one fp32
  copy of the calibration hidden states ``[samples, T, D]``, one batch's layer activations
  (:data:`slimlm.calib.driver.BATCH_TOKENS` tokens), and the largest group of Hessians alive at once
  (one fp32 ``[in, in]`` per linear of a true-sequential group, q/k/v: three) with the GPTQ solve's
  temporaries (``H^-1`` and the Cholesky factor ``[in, in]``, weight copies ``[out, in]``).
"""

from __future__ import annotations

import math

from slimlm.plan.shapes import ModelShape
from slimlm.utils.errors import SlimlmError

ELT = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
OPTIMIZERS = ("adamw", "adafactor", "lion", "came", "adamw8bit", "lomo", "galore")


def elt(dtype: str) -> int:
    if dtype not in ELT:
        raise SlimlmError(f"unknown dtype {dtype!r}; known: {', '.join(ELT)}")
    return ELT[dtype]


# --- KV cache --------------------------------------------------------------------------------------
def kv_bytes_per_token(shape: ModelShape, kv_dtype: str) -> int:
    """K plus V of one token over every layer."""
    c = shape.config
    return 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * elt(kv_dtype)


def kv_cache_bytes(shape: ModelShape, context: int, batch: int, kv_dtype: str, block_size: int = 0) -> int:
    """The cache for ``batch`` sequences of ``context`` tokens; ``block_size > 0``: paged (whole blocks)."""
    per = kv_bytes_per_token(shape, kv_dtype)
    if block_size > 0:
        return batch * math.ceil(context / block_size) * block_size * per
    return batch * context * per


def kv_pool_bytes(shape: ModelShape, budget_gib: float, kv_dtype: str, block_size: int) -> int:
    """The serving engine's block pool: as many whole blocks as fit in ``budget_gib`` (``LLM`` computes
    it the same way from ``SchedulerConfig.kv_budget_gib``), zero-filled at start, so all resident."""
    per_block = block_size * kv_bytes_per_token(shape, kv_dtype)
    return int(budget_gib * 2**30 // per_block) * per_block


# --- activations -----------------------------------------------------------------------------------
def _dims(shape: ModelShape) -> tuple[int, int, int, int, int]:
    c = shape.config
    return c.hidden_size, c.q_size, c.kv_size, c.intermediate_size, c.vocab_size


def inference_activation_bytes(shape: ModelShape, tokens: int, batch: int, act_dtype: str) -> int:
    """Peak transient of a prefill of ``tokens`` per sequence: one layer's live tensors + last logits.

    Live at the MLP (the larger half for every supported family): the residual stream and its norm
    ``2D``, the fused gate|up output ``2I``, the activation product ``I``; at attention: q|k|v
    ``Q + 2KV``, the rotated copies ``Q + KV`` and the attention output ``Q``, beside the residual ``D``.
    """
    d, q, kv, inter, vocab = _dims(shape)
    mult = 2 if shape.config.gated_mlp else 1
    mlp = 2 * d + (mult + 1) * inter
    attn = 2 * d + 3 * q + 3 * kv
    e = elt(act_dtype)
    return batch * tokens * max(mlp, attn) * e + batch * vocab * 4


def training_activation_bytes(shape: ModelShape, seq_len: int, batch: int, act_dtype: str,
                              checkpointing: bool, lora_rank: int = 0, masked: bool = True) -> int:
    """What autograd keeps for the backward pass of one ``[batch, seq_len]`` step (see the module docstring).

    Per token and layer (training runs the unfused q/k/v and gate/up): the two norms' inputs and
    outputs ``4D``; the rotated q and the attention output ``2Q``, k and v ``2KV``, SDPA's log-sum-exp
    (heads); gate and up outputs, the activation and the product ``4I`` (non-gated: ``2I``); with
    LoRA, each adapted linear's ``r``-wide ``A x`` (seven per layer). ``masked`` (packed or padded
    windows: the trainer's case): SDPA converts the boolean mask ``[B, 1, T, T]`` to a float copy it
    keeps, per layer. Checkpointing keeps each layer's input and one recomputed layer. The head runs
    in 64 MiB chunks of logits (``Transformer.lm_loss_sum``): one chunk's logits, log-softmax and
    their gradient in flight, plus the counted rows' hidden states and their gradient."""
    d = shape.config.hidden_size
    tokens = batch * seq_len
    saved = training_saved_bytes(shape, seq_len, batch, act_dtype, checkpointing, lora_rank, masked)
    if checkpointing:  # backward recomputes one layer at a time: its saved set exists once more
        saved += training_saved_bytes(shape, seq_len, batch, act_dtype, False, lora_rank, masked) // shape.config.num_hidden_layers
    chunk = 64 * 2**20  # Transformer.lm_loss_sum's chunk of fp32 logits
    return saved + 3 * min(chunk, tokens * shape.config.vocab_size * 4) + tokens * d * 4


def training_saved_bytes(shape: ModelShape, seq_len: int, batch: int, act_dtype: str, checkpointing: bool,
                         lora_rank: int = 0, masked: bool = True) -> int:
    """The tensors autograd saves in the forward of one step (see :func:`training_activation_bytes`)."""
    c = shape.config
    d, q, kv, inter, _ = _dims(shape)
    mlp = 4 * inter if c.gated_mlp else 2 * inter
    per_layer = 4 * d + 2 * q + 2 * kv + c.num_attention_heads + mlp + (7 * lora_rank if lora_rank else 0)
    e = elt(act_dtype)
    tokens = batch * seq_len
    layers = c.num_hidden_layers
    head_rows = tokens * d * 4  # the counted rows' hidden states, the chunked loss's input
    if checkpointing:
        return tokens * d * e * layers + head_rows  # each layer's input
    mask = batch * seq_len * seq_len * 4 if masked else 0  # the float copy of the mask, per layer
    return (tokens * per_layer * e + mask) * layers + head_rows


# --- loading ---------------------------------------------------------------------------------------
_FUSED = ("q_proj", "k_proj", "v_proj")
_FUSED_GATED = ("gate_proj", "up_proj")


def load_transient_bytes(shape: ModelShape, dtype: str, checkpoint_dtype: str | None) -> int:
    """Bytes a float load holds beyond the finished model at its peak (see the module docstring):
    the separate q/k/v (and gate/up) weights beside their fused copy, plus the checkpoint's copy of
    every float weight when ``checkpoint_dtype`` differs from the model's ``dtype``."""
    names = _FUSED + (_FUSED_GATED if shape.config.gated_mlp else ())
    fused = sum(lin.numel + (lin.out_features if lin.bias else 0) for lin in shape.decoder_linears()
                if lin.path.rsplit(".", 1)[-1] in names) * elt(dtype)
    convert = shape.n_params * elt(checkpoint_dtype) if checkpoint_dtype and checkpoint_dtype != dtype else 0
    return fused + convert


# --- training states -------------------------------------------------------------------------------
def trainable_matrices(shape: ModelShape, method: str, lora_rank: int) -> list[tuple[int, int]]:
    """``(rows, cols)`` of every trainable tensor: all parameters (full) or the LoRA A/B pairs."""
    if method == "full":
        mats = [(lin.out_features, lin.in_features) for lin in shape.linears]
        mats += [(1, lin.out_features) for lin in shape.linears if lin.bias]
        for n in shape.other_params.values():
            rows = shape.config.hidden_size if n % max(1, shape.config.hidden_size) == 0 and n > shape.config.hidden_size else 1
            mats.append((n // rows, rows) if rows > 1 else (1, n))
        return mats
    if method == "lora":
        out: list[tuple[int, int]] = []
        for lin in shape.decoder_linears():  # adapters on every decoder linear: A [r, in], B [out, r]
            out += [(lora_rank, lin.in_features), (lin.out_features, lora_rank)]
        return out
    raise SlimlmError(f"unknown fine-tuning method {method!r}; known: full, lora")


def optimizer_state_bytes(mats: list[tuple[int, int]], optimizer: str, galore_rank: int = 128) -> int:
    """Optimizer states for trainable tensors ``mats`` (see the module docstring for each optimizer)."""
    total = 0
    for r, c in mats:
        n = r * c
        matrix = r > 1 and c > 1
        if optimizer == "adamw":
            total += 8 * n
        elif optimizer == "lion":
            total += 4 * n
        elif optimizer == "adamw8bit":
            total += 2 * n + 2 * 4 * math.ceil(n / 2048)
        elif optimizer == "adafactor":
            total += 4 * (r + c) if matrix else 4 * n
        elif optimizer == "came":
            total += 4 * n + (8 * (r + c) if matrix else 8 * n)
        elif optimizer == "lomo":
            total += 0
        elif optimizer == "galore":
            if matrix and min(r, c) > galore_rank:
                m, k = min(r, c), max(r, c)
                total += 4 * m * galore_rank + 8 * galore_rank * k
            else:
                total += 8 * n
        else:
            raise SlimlmError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
    return total


def gradient_bytes(mats: list[tuple[int, int]], optimizer: str, grad_dtype: str = "fp32") -> int:
    """Gradients of the trainable tensors; LOMO holds one tensor's gradient at a time (the largest)."""
    sizes = [r * c for r, c in mats]
    if not sizes:
        return 0
    return (max(sizes) if optimizer == "lomo" else sum(sizes)) * elt(grad_dtype)


# --- calibration -----------------------------------------------------------------------------------
def calibration_bytes(shape: ModelShape, samples: int, seq_len: int, batch_tokens: int = 0) -> dict[str, int]:
    """GPTQ calibration beside the dense fp32 model: hidden states, one batch's activations, Hessians."""
    from slimlm.calib.driver import BATCH_TOKENS

    c = shape.config
    d = c.hidden_size
    hidden = samples * seq_len * d * 4
    per_batch = max(1, (batch_tokens or BATCH_TOKENS) // seq_len) * seq_len
    batch_act = inference_activation_bytes(shape, per_batch, 1, "fp32") - c.vocab_size * 4
    groups = [3 * d * d, c.q_size * c.q_size, (2 if c.gated_mlp else 1) * d * d, c.intermediate_size ** 2]
    hess = max(groups) * 4
    widest = max(lin.in_features for lin in shape.decoder_linears())
    tallest = max(lin.numel for lin in shape.decoder_linears())
    solve = 2 * widest * widest * 4 + 3 * tallest * 4  # H^-1 + Cholesky [in, in]; w, q, err copies [out, in]
    return {"hidden_states": hidden, "batch_activations": batch_act, "hessians": hess, "gptq_solve": solve,
            "total": hidden + batch_act + hess + solve}
