"""``plan(shape, PlanConfig)``: memory, speed and compute of one task, before anything runs.

The memory of a task is the sum of named terms (weights in the chosen format, KV cache, activations,
gradients, optimizer states, calibration buffers) plus the process's fixed residue (the interpreter,
torch, slimlm's kernels: measured once in a fresh interpreter, cached with the roofline). It is checked
against ``MemAvailable`` of /proc/meminfo (or ``memory_gib``), and the largest batch at the context, and
the largest context at the batch, that fit are searched on the same terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from slimlm.plan import memory as mem
from slimlm.plan.chinchilla import CHINCHILLA
from slimlm.plan.formats import parse_format, weight_bytes
from slimlm.plan.roofline import measured_kind, predict_decode, predict_prefill, prefill_flops
from slimlm.plan.shapes import ModelShape
from slimlm.utils.errors import SlimlmError

TASKS = ("inference", "serve", "finetune", "quantize", "pretrain")
DEFAULT_RESIDUE = 400 * 2**20  # used only when nothing was measured (--no-measure without a cache); stated


@dataclass
class PlanConfig:
    task: str = "inference"
    formats: list[str] = field(default_factory=lambda: ["fp32", "bf16", "int8", "int4"])
    dtype: str = "fp32"  # float dtype of what stays float
    context: int = 2048
    batch: int = 1
    kv_dtype: str = ""  # default: the model dtype (slimlm caches K/V in it)
    block_size: int = 16  # serve: tokens per KV block
    # serve: tokens per engine step (the prefill chunk): the engine's SchedulerConfig default (tested)
    batched_tokens: int = 512
    # serve: the KV pool the engine allocates (and touches) up front: SchedulerConfig's default (tested)
    kv_budget_gib: float = 1.0
    seq_len: int = 512  # finetune / pretrain
    checkpointing: bool = False
    method: str = "lora"  # finetune: full | lora
    lora_rank: int = 16
    optimizer: str = "adamw"
    galore_rank: int = 128
    calib_samples: int = 128
    calib_seq_len: int = 512
    flops: float | None = None
    cpu_hours: float | None = None
    tokens: float | None = None  # pretrain: D for the predicted loss of (N, D)
    memory_bytes: int | None = None

    def check(self) -> None:
        if self.task not in TASKS:
            raise SlimlmError(f"unknown task {self.task!r}; known: {', '.join(TASKS)}")
        if self.optimizer not in mem.OPTIMIZERS:
            raise SlimlmError(f"unknown optimizer {self.optimizer!r}; known: {', '.join(mem.OPTIMIZERS)}")
        if self.method not in ("full", "lora"):
            raise SlimlmError(f"unknown fine-tuning method {self.method!r}; known: full, lora")
        for f in self.formats:
            parse_format(f)
        if not self.kv_budget_gib > 0:
            raise SlimlmError(f"kv-budget-gib must be > 0, got {self.kv_budget_gib:g}")
        for name in ("flops", "cpu_hours", "tokens"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise SlimlmError(f"{name.replace('_', '-')} must be > 0, got {v:g}")


def available_memory() -> int:
    """``MemAvailable`` of /proc/meminfo in bytes (0 where unreadable)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def task_memory(shape: ModelShape, cfg: PlanConfig, fmt_name: str, batch: int, context: int,
                residue: int) -> dict[str, int]:
    """Named memory terms (bytes) of ``cfg.task`` for one weight format at ``batch`` x ``context``."""
    dtype = _float(cfg, fmt_name)
    kv_dtype = _kv_dtype(cfg, fmt_name)
    terms: dict[str, int] = {"residue": residue}
    if cfg.task == "quantize":
        terms["weights (dense fp32)"] = weight_bytes(shape, parse_format("fp32"))["total"]
        cal = mem.calibration_bytes(shape, cfg.calib_samples, cfg.calib_seq_len)
        terms["calibration hidden states"] = cal["hidden_states"]
        terms["calibration batch activations"] = cal["batch_activations"]
        terms["hessians + gptq solve"] = cal["hessians"] + cal["gptq_solve"]
        return _with_load(terms, shape, "fp32")
    terms["weights"] = weight_bytes(shape, parse_format(fmt_name), dtype)["total"]
    if cfg.task == "inference":
        terms["kv cache"] = mem.kv_cache_bytes(shape, context, batch, kv_dtype)
        terms["activations (prefill)"] = mem.inference_activation_bytes(shape, context, batch, dtype)
    elif cfg.task == "serve":  # the engine zero-fills its whole pool at start: resident whatever the load
        terms["kv pool (budget)"] = mem.kv_pool_bytes(shape, cfg.kv_budget_gib, kv_dtype, cfg.block_size)
        terms["activations (step)"] = mem.inference_activation_bytes(shape, min(cfg.batched_tokens, batch * context),
                                                                   1, dtype)
    else:  # finetune / pretrain
        method = "full" if cfg.task == "pretrain" else cfg.method
        mats = mem.trainable_matrices(shape, method, cfg.lora_rank)
        if method == "lora":
            terms["adapter weights"] = sum(r * c for r, c in mats) * 4
        terms["gradients"] = mem.gradient_bytes(mats, cfg.optimizer)
        terms[f"optimizer ({cfg.optimizer})"] = mem.optimizer_state_bytes(mats, cfg.optimizer, cfg.galore_rank)
        terms["activations (training)"] = mem.training_activation_bytes(
            shape, context, batch, dtype, cfg.checkpointing, cfg.lora_rank if method == "lora" else 0)
    return _with_load(terms, shape, dtype) if parse_format(fmt_name).kind == "float" else terms


def _float(cfg: PlanConfig, fmt_name: str) -> str:
    """The dtype of what stays float in a variant."""
    return "bf16" if fmt_name == "bf16" else cfg.dtype


def _kv_dtype(cfg: PlanConfig, fmt_name: str) -> str:
    """The KV cache's dtype: ``kv_dtype``, else the variant's float dtype (slimlm caches K/V in it)."""
    return cfg.kv_dtype or _float(cfg, fmt_name)


def _with_load(terms: dict[str, int], shape: ModelShape, dtype: str) -> dict[str, int]:
    """Add the float load's transient where it exceeds the run's own terms: the process peaks at
    residue + weights + max(load transient, run terms), the load's extra copies being freed before
    the run allocates (``memory.load_transient_bytes``)."""
    run = sum(v for k, v in terms.items() if k != "residue" and not k.startswith("weights"))
    extra = mem.load_transient_bytes(shape, dtype, shape.checkpoint_dtype) - run
    if extra > 0:
        terms["load transient beyond the run"] = extra
    return terms


def _largest(fits: Any, lo: int, hi: int) -> int:
    """The largest ``x`` in ``[lo, hi]`` with ``fits(x)`` (monotone), 0 if none."""
    if not fits(lo):
        return 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def planned_context(shape: ModelShape, cfg: PlanConfig) -> int:
    """The context the plan is for; SlimlmError when an inference context exceeds the model's positions
    (checked by the CLI before it measures the CPU, which takes minutes without a cached roofline)."""
    c = shape.config
    train = cfg.task in ("finetune", "pretrain")
    context = cfg.seq_len if train else cfg.context
    if cfg.task == "quantize":
        context = cfg.calib_seq_len
    if not train and cfg.task != "quantize" and context > c.max_position_embeddings:
        raise SlimlmError(f"context {context} exceeds the model's {c.max_position_embeddings} positions")
    return context


def plan(shape: ModelShape, cfg: PlanConfig, roof: dict[str, Any] | None) -> dict[str, Any]:
    """The whole plan as one JSON-ready dict (the CLI prints it as tables)."""
    cfg.check()
    c = shape.config
    train = cfg.task in ("finetune", "pretrain")
    context = planned_context(shape, cfg)
    residue = int(roof.get("residue_bytes") or 0) if roof else 0
    residue_measured = residue > 0
    residue = residue or DEFAULT_RESIDUE
    avail = cfg.memory_bytes or available_memory()
    formats = ["fp32"] if cfg.task == "quantize" else list(dict.fromkeys(cfg.formats))
    variants = []
    for fmt_name in formats:
        terms = task_memory(shape, cfg, fmt_name, cfg.batch, context, residue)
        total = sum(terms.values())
        v: dict[str, Any] = {"format": fmt_name, "memory": terms, "total_bytes": total,
                             "fits": bool(avail) and total <= avail}
        if cfg.task == "serve":  # the streams share the pool: beyond it the engine queues or preempts
            need = mem.kv_cache_bytes(shape, context, cfg.batch, _kv_dtype(cfg, fmt_name), cfg.block_size)
            v["kv_needed_bytes"] = need
            v["streams_in_pool"] = terms["kv pool (budget)"] // max(1, need // cfg.batch)
        if avail and cfg.task != "quantize":
            pool = terms.get("kv pool (budget)", 0)

            def fits(b: int, t: int, fmt_name: str = fmt_name, pool: int = pool) -> bool:
                if pool:  # serve: memory is fixed by the pool; what fits is what the pool holds
                    if mem.kv_cache_bytes(shape, t, b, _kv_dtype(cfg, fmt_name), cfg.block_size) > pool:
                        return False
                return sum(task_memory(shape, cfg, fmt_name, b, t, residue).values()) <= avail
            v["max_batch"] = _largest(lambda b: fits(b, context), 1, 1 << 16)
            max_ctx = c.max_position_embeddings if not train else 1 << 20
            v["max_context"] = _largest(lambda t: fits(cfg.batch, t), 1, max_ctx)
        if roof and "formats" in roof and cfg.task in ("inference", "serve"):
            v["speed"] = speed(shape, roof, fmt_name, cfg, context)
        variants.append(v)
    out: dict[str, Any] = {
        "model": shape.source, "architecture": c.architecture, "parameters": shape.n_params,
        "non_embedding_parameters": shape.n_non_embedding, "layers": c.num_hidden_layers,
        "kv_heads": c.num_key_value_heads, "head_dim": c.head_dim, "task": cfg.task,
        "batch": cfg.batch, "context": context, "available_bytes": avail,
        "residue_bytes": residue, "residue_measured": residue_measured, "variants": variants,
    }
    if train:
        out["optimizer"] = cfg.optimizer
        out["method"] = "full" if cfg.task == "pretrain" else cfg.method
        out["checkpointing"] = cfg.checkpointing
    if roof:
        out["machine"] = {k: roof.get(k) for k in ("cpu_model", "threads", "bandwidth_gbs", "gemm_gflops",
                                                   "cache_file", "measured_at")}
    comp = compute(shape, cfg, roof)
    if comp:
        out["compute"] = comp
    return out


def speed(shape: ModelShape, roof: dict[str, Any], fmt_name: str, cfg: PlanConfig, context: int) -> dict[str, Any]:
    """Predicted decode (batch 1 and ``cfg.batch`` streams) and prefill tok/s of one variant."""
    f = parse_format(fmt_name)
    dtype = _float(cfg, fmt_name)
    wb = weight_bytes(shape, f, dtype)
    kind = _native_kind(shape, dtype) if f.kind == "native" else measured_kind(fmt_name, f.kind, f.bits)
    kv_tok = mem.kv_bytes_per_token(shape, _kv_dtype(cfg, fmt_name))
    layers = shape.config.num_hidden_layers
    mid = context // 2  # the KV read grows over a generation: its mean length
    decode1 = predict_decode(roof, kind, wb["decode_read"] + kv_tok * mid, layers)
    decode_b = predict_decode(roof, kind, wb["decode_read"] + cfg.batch * kv_tok * mid, layers, cfg.batch)
    prompt = min(context, 512)
    pre = predict_prefill(roof, kind, prefill_flops(shape, prompt), prompt)
    fr = roof["formats"][kind]
    return {"decode_tok_s": decode1, f"decode_tok_s_batch{cfg.batch}": decode_b, "prefill_tok_s": pre,
            "prefill_tokens": prompt, "bytes_per_token": wb["decode_read"] + kv_tok * mid, "efficiency_of": kind,
            "decode_efficiency": fr["decode_efficiency"], "prefill_efficiency": fr["prefill_efficiency"]}


def _native_kind(shape: ModelShape, dtype: str) -> str:
    types = [t for t in shape.gguf_types.values() if t not in ("F32", "F16", "BF16")]
    if types:
        common = max(set(types), key=types.count)
        return measured_kind(common, "gguf", 4)
    return "bf16" if dtype == "bf16" else "fp32"


def compute(shape: ModelShape, cfg: PlanConfig, roof: dict[str, Any] | None) -> dict[str, Any] | None:
    """Chinchilla: the loss-optimal (N, D) of a budget, and the predicted loss of this model at D tokens."""
    out: dict[str, Any] = {}
    flops = cfg.flops
    if cfg.cpu_hours is not None:
        if not roof:
            raise SlimlmError("--cpu-hours needs this machine's measured rate (drop --no-measure)")
        rate = roof["formats"]["fp32"]["prefill_flops_per_s"]
        flops = cfg.cpu_hours * 3600 * rate
        out["training_flops_per_s"] = rate
        out["cpu_hours"] = cfg.cpu_hours
    if flops is not None:
        n, d = CHINCHILLA.optimal(flops)
        out.update({"budget_flops": flops, "optimal_parameters": n, "optimal_tokens": d,
                    "optimal_loss": CHINCHILLA.loss(n, d), "tokens_per_parameter": d / n})
    n_model = shape.n_non_embedding
    d_model = cfg.tokens if cfg.tokens is not None else (flops / (6 * n_model) if flops is not None else None)
    if d_model is not None:
        out.update({"model_parameters": n_model, "model_tokens": d_model,
                    "model_loss": CHINCHILLA.loss(n_model, d_model), "model_flops": 6 * n_model * d_model})
    return out or None
