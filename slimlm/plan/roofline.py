"""A roofline of this CPU, measured once and cached: bandwidth, GEMM rate, and what slimlm reaches of them.

Why: decode at batch 1 reads every weight once per token, so its time is ``bytes / bandwidth`` plus a
fixed cost per layer (Python dispatch, kernel calls); prefill multiplies ``[T, in] x [in, out]``, so its
time is ``FLOPs / GEMM rate``. The raw limits (a 256 MiB sum, a 1024^3 matmul) say what the machine
can do; the *efficiency factors* say what slimlm's runtime reaches of them, and they are measured too,
on synthetic models built in this process (random weights, the real runtime, nothing downloaded):

- per weight format (fp32, bf16, int8, int4 g128): a 4-layer model of hidden 768 (113 MB of fp32
  weights, beyond most last-level caches) and a 4-layer model of hidden 64 (pure per-layer overhead)
  each decode 12 tokens (median step; before each step of the big one a read of twice the
  last-level cache evicts its weights, which would otherwise sit in a large L3 and decode faster
  than a real model ever does); ``decode_eff = (bytes_read / (t_big - t_small)) / bandwidth``
  and the per-layer overhead ``t_small / layers``; the big one's 128-token prefill gives
  ``prefill_eff = FLOP/s / GEMM
  rate`` (the bf16 GEMM rate for bf16, the fp32 one otherwise: quantized linears de-quantize into it).

Predictions (:func:`predict_decode`, :func:`predict_prefill`) apply these numbers to another model's
bytes and FLOPs; formats not measured borrow the nearest measured kind (intB and GGUF 4-bit types:
int4's; Q8_0/Q5/Q6: int8's; nf4: int4's). The cache is JSON under ``$XDG_CACHE_HOME/slimlm`` (default
``~/.cache/slimlm``), keyed by CPU model, threads, torch version and slimlm's kernel availability;
``slimlm plan --remeasure`` refreshes it. A measurement takes ~15 s on 2 quiet cores (minutes on a
loaded machine).
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from slimlm.utils.cpu import cpu_model

ROOFLINE_VERSION = 2  # 2: decode probes evict the last-level cache between steps
MEASURED_FORMATS = ("fp32", "bf16", "int8", "int4")
_BIG = dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=12,
            num_key_value_heads=4, vocab_size=4096)
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "slimlm"


def cache_key() -> str:
    from slimlm import kernels

    return f"{cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}|" \
           f"kernels={kernels.supported()[0]}|v{ROOFLINE_VERSION}"


def load_roofline(remeasure: bool = False, progress: bool = True) -> dict[str, Any]:
    """The cached roofline of this machine (measured now when absent, stale or ``remeasure``)."""
    path = cache_dir() / "roofline.json"
    key = cache_key()
    if not remeasure and path.is_file():
        try:
            data = json.loads(path.read_text())
            if isinstance(data, dict) and data.get("key") == key and "formats" in data:
                data["cache_file"] = str(path)
                return data
        except (OSError, json.JSONDecodeError):
            pass  # a corrupt cache is measured again
    if progress:
        print("slimlm plan: measuring this CPU once (bandwidth, GEMM rate, decode/prefill on synthetic "
              f"models; ~15 s on a quiet machine), cached in {path}", file=sys.stderr, flush=True)
    data = measure_roofline()
    data["key"] = key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.rename(path)
    data["cache_file"] = str(path)
    return data


# --- raw limits ------------------------------------------------------------------------------------
def _best(fn: Any, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """Read bandwidth in GB/s: a sum over a buffer far larger than the caches (best of ``repeats``)."""
    buf = torch.empty(mib * 2**20 // 4, dtype=torch.float32).uniform_()
    s = _best(lambda: buf.sum(), repeats)
    return buf.numel() * 4 / s / 1e9


def measure_gemm(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    """GFLOP/s of an ``n^3`` matmul in ``dtype`` (best of ``repeats``)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best(lambda: a @ b, repeats) / 1e9


def measure_residue() -> int:
    """RSS of a fresh interpreter after importing torch and slimlm's runtime, loaders and kernels (bytes)."""
    code = ("import torch, slimlm.loaders, slimlm.quant.linear, slimlm.engine.generate\n"
            "from slimlm import kernels\n"
            "kernels.supported()[0] and kernels.load()\n"
            "from slimlm.utils.memory import release_free_memory, current_rss_bytes\n"
            "release_free_memory(); print(current_rss_bytes())\n")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        return int(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError, OSError):
        return 0


# --- synthetic models --------------------------------------------------------------------------------
def synthetic_model(dims: dict[str, int], fmt: str) -> torch.nn.Module:
    """A random Llama-form runtime model in ``fmt`` (fp32/bf16 float, or RTN int8 / int4 g128)."""
    from slimlm.models.config import ModelConfig
    from slimlm.models.transformer import Transformer

    cfg = ModelConfig.from_hf({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                               "max_position_embeddings": 4096, "tie_word_embeddings": False, **dims})
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    if fmt == "bf16":
        model = model.to(torch.bfloat16)
    elif fmt in ("int8", "int4"):
        from slimlm.quant.api import quantize_
        from slimlm.quant.methods.rtn import RTNConfig

        rtn = RTNConfig(bits=8, group_size=-1, symmetric=True) if fmt == "int8" else RTNConfig(bits=4, group_size=128)
        quantize_(model, rtn)
    model.eval()
    model.requires_grad_(False)
    model.fuse_projections_()  # type: ignore[operator]
    return model


def last_level_cache_bytes() -> int:
    """The largest CPU cache in bytes (sysfs ``cache/index*/size`` of cpu0), 0 where unreadable."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            txt = (d / "size").read_text().strip().upper()
        except OSError:
            continue
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(txt[-1:], 1)
        digits = txt.rstrip("KMG")
        if digits.isdigit():
            best = max(best, int(digits) * mult)
    return best


def eviction_buffer() -> torch.Tensor:
    """A buffer twice the last-level cache (at least 64 MiB): reading it between decode steps leaves
    the probe's weights out of cache, as a real model's are (its weights far exceed the cache, so
    each token streams them from memory; a probe model that fits the cache would decode faster
    than any real one: session 10's probes did, by 28-83%)."""
    return torch.ones(max(64 * 2**20, 2 * last_level_cache_bytes()) // 4, dtype=torch.float32)


@torch.inference_mode()
def time_decode(model: torch.nn.Module, steps: int = 12, context: int = 32, evict: torch.Tensor | None = None) -> float:
    """Median seconds of one batch-1 decode step after a ``context``-token prompt (``evict``: a buffer
    read before each step, untimed, so the weights come from memory: :func:`eviction_buffer`)."""
    from slimlm.models.kv_cache import KVCache

    cfg: Any = model.config
    ids = torch.randint(0, int(cfg.vocab_size), (1, context))
    cache = KVCache.for_model(cfg, 1, context + steps + 1, next(model.parameters()).dtype)
    model(ids, cache=cache, last_only=True)
    nxt = torch.zeros(1, 1, dtype=torch.long)
    times = []
    for i in range(steps):
        if evict is not None:
            evict.sum()
        t = time.perf_counter()
        model(nxt, positions=torch.tensor([[context + i]]), cache=cache)
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


@torch.inference_mode()
def time_prefill(model: torch.nn.Module, tokens: int = 128) -> float:
    cfg: Any = model.config
    ids = torch.randint(0, int(cfg.vocab_size), (1, tokens))
    return _best(lambda: model(ids, last_only=True), 2)


def measure_roofline() -> dict[str, Any]:
    from slimlm.plan.formats import parse_format, weight_bytes
    from slimlm.plan.shapes import shape_from_config
    from slimlm.utils.memory import release_free_memory

    t0 = time.perf_counter()
    bw = measure_bandwidth()
    gemm = {"fp32": measure_gemm(torch.float32), "bf16": measure_gemm(torch.bfloat16)}
    hf = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "max_position_embeddings": 4096,
          "tie_word_embeddings": False}
    big_shape = shape_from_config({**hf, **_BIG})
    formats: dict[str, Any] = {}
    evict = eviction_buffer()
    for fmt in MEASURED_FORMATS:
        small = synthetic_model(_SMALL, fmt)
        t_small = time_decode(small)  # pure per-layer overhead: its few weights stay cached in a real run too
        del small
        big = synthetic_model(_BIG, fmt)
        t_big = time_decode(big, evict=evict)
        t_pre = time_prefill(big)
        del big
        gc.collect()
        release_free_memory()
        wb = weight_bytes(big_shape, parse_format(fmt), "fp32")
        read = wb["decode_read"] + big_shape.config.num_hidden_layers * 0  # KV of 32 tokens: negligible
        flops = prefill_flops(big_shape, 128)
        layers = _BIG["num_hidden_layers"]
        rate = read / max(t_big - t_small, 1e-6)
        formats[fmt] = {
            "decode_bytes_per_s": rate, "decode_efficiency": rate / (bw * 1e9),
            "overhead_per_layer_s": t_small / layers,
            "prefill_flops_per_s": flops / t_pre,
            "prefill_efficiency": flops / t_pre / (gemm["bf16" if fmt == "bf16" else "fp32"] * 1e9),
            "probe": {"t_decode_big_s": t_big, "t_decode_small_s": t_small, "t_prefill_128_s": t_pre,
                      "bytes_read": read},
        }
    return {"version": ROOFLINE_VERSION, "cpu_model": cpu_model(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "bandwidth_gbs": bw, "gemm_gflops": gemm, "formats": formats,
            "last_level_cache_bytes": last_level_cache_bytes(), "evict_bytes": evict.numel() * 4,
            "residue_bytes": measure_residue(), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": time.perf_counter() - t0}


# --- predictions -----------------------------------------------------------------------------------
def measured_kind(fmt_name: str, kind: str, bits: int) -> str:
    """Which measured format's efficiency a format borrows (see the module docstring)."""
    if fmt_name in MEASURED_FORMATS:
        return fmt_name
    if kind == "float":
        return "fp32"
    if kind == "int8" or (kind == "intx" and bits >= 5):
        return "int8"
    if kind == "gguf":
        from slimlm.plan.formats import gguf_layouts

        return "int4" if gguf_layouts()[fmt_name][3] else "int8"
    return "int4"


def prefill_flops(shape: Any, tokens: int) -> float:
    """Multiply-adds x2 of one prefill of ``tokens``: every decoder linear, causal attention, the last logits."""
    c = shape.config
    lin = sum(x.numel for x in shape.decoder_linears())
    attn = 2 * c.num_hidden_layers * tokens * tokens * c.q_size  # QK^T and PV, causal half: 2 * (2 T^2 Q / 2)
    head = c.vocab_size * c.hidden_size
    return 2.0 * lin * tokens + attn + 2.0 * head


def predict_decode(roof: dict[str, Any], kind_name: str, read_bytes: float, layers: int, batch: int = 1) -> float:
    """Decode tokens/s (all ``batch`` streams together): weights read once per step, KV per stream."""
    f = roof["formats"][kind_name]
    step = read_bytes / f["decode_bytes_per_s"] + layers * f["overhead_per_layer_s"]
    return batch / step


def predict_prefill(roof: dict[str, Any], kind_name: str, flops: float, tokens: int) -> float:
    """Prefill tokens/s: FLOPs at the measured fraction of the GEMM rate."""
    return tokens / (flops / roof["formats"][kind_name]["prefill_flops_per_s"])
