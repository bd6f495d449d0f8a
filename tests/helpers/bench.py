"""Hand-built bench runs with chosen numbers (report tests: the verdicts are checked against them).

``fake_run("alpha", [("base", 400e6, 10.0, 10.0), ("w4", 100e6, 21.0, 10.6)])`` is one run of the
results schema on machine "alpha": per variant (label, weight bytes, decode tok/s, perplexity).
"""

from __future__ import annotations

from typing import Any


def _summary(x: float) -> dict[str, Any]:
    return {"median": x, "min": x * 0.95, "max": x * 1.05, "spread": 0.1, "n": 3, "runs": [x * 0.95, x, x * 1.05]}


def fake_variant(label: str, weight_bytes: float, decode: float, ppl: float, corpus: str = "wiki.txt") -> dict[str, Any]:
    import math

    return {"label": label, "spec": label, "model": f"/models/{label}", "dtype": "fp32", "adapter": None,
            "status": "ok", "error": None, "format": "hf", "architecture": "LlamaForCausalLM",
            "parameters": 100_000_000, "weight_bytes": int(weight_bytes),
            "bits_per_weight": weight_bytes * 8 / 100_000_000, "size_on_disk_bytes": int(weight_bytes),
            "memory": {"rss_before_load_bytes": 300_000_000, "rss_after_load_bytes": int(300e6 + weight_bytes),
                       "load_rss_bytes": int(weight_bytes), "peak_rss_bytes": int(400e6 + weight_bytes),
                       "tensor_bytes": int(weight_bytes), "kv_cache_bytes_per_token": 1024,
                       "kv_cache_bytes": {"batch_1": 1024 * 160}},
            "perplexity": {corpus: {"perplexity": ppl, "nll": math.log(ppl), "tokens_scored": 1000, "windows": 2,
                                    "seq_len": 512, "seconds": 1.0}},
            "speed": {"decode_tok_s": _summary(decode), "prefill_tok_s": _summary(decode * 20),
                      "ttft_s": _summary(0.05)}}


def fake_run(machine: str, variants: list[tuple[str, float, float, float]], run_id: str | None = None,
             started: str = "2026-12-01T10:00:00+0000") -> dict[str, Any]:
    vs = [fake_variant(*v) for v in variants]
    return {"run_id": run_id or f"run-{machine}", "started": started, "finished": started, "command": "slimlm bench",
            "base": vs[0]["label"],
            "machine": {"name": machine, "cpu_model": f"CPU of {machine}", "cpu_capability": "AVX2",
                        "cpu_flags": ["avx2"], "cores": 2, "threads": 2, "bandwidth_GBps": 10.0,
                        "gemm_gflops": {"fp32": 100.0, "bf16": 50.0}},
            "software": {"python": "3.11.7", "torch": "2.13.0"},
            "settings": {"prompt_tokens": 128, "new_tokens": 32, "concurrency": 1, "repeats": 3, "warmup": 1,
                         "seq_len": 512, "max_tokens": 4096, "threads": 2},
            "corpora": [{"name": "wiki.txt", "path": "wiki.txt", "sha256": "0" * 64, "chars": 100}],
            "variants": vs}


def fake_results(*runs: dict[str, Any]) -> dict[str, Any]:
    return {"schema": "slimlm-bench-results", "schema_version": 1, "runs": list(runs)}
