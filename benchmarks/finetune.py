"""LoRA fine-tuning speed and memory: slimlm's trainer vs transformers + peft, same model, data, dtype.

SmolLM2-135M (the ``smollm2-135m`` alias, de-quantized to float for both sides: transformers loads
slimlm's HF export of it), LoRA r=16 / alpha 32 on all seven attention and MLP linears, AdamW
lr 2e-4, batch 1 x ``--seq-len`` tokens of the same text windows, the same number of steps. Each
side runs in its own subprocess (peak RSS is per process); the first ``--warmup`` steps are not
timed. Reported: tokens/s, peak RSS and the last loss per side, and slimlm / transformers ratios
(only ratios mean anything on a shared machine).

``peak_rss_bytes`` is the whole process (loading included); ``steps_peak_rss_bytes`` only the training
steps (the kernel's high-water mark is reset just before the first one) and ``activation_bytes`` what
the steps add above the resident model (activations, gradients, optimizer state, freed-but-kept heap).

``--variants`` adds rows on the same model, data and dtype (slimlm; transformers + peft too where peft
has the method): ``lora-ckpt`` (activation checkpointing), ``qlora-nf4`` / ``qlora-nf4-ckpt`` (LoRA
on an NF4-quantized base, QLoRA's storage), ``qlora-gguf`` (LoRA on the alias's own GGUF Q4_1
weights, run natively), ``dora``, ``ia3`` (k/v/down), ``prompt`` (8 virtual tokens), ``houlsby``
(bottleneck 16 after o_proj and down_proj; slimlm only). ``--live-heap`` runs every side with
``MALLOC_MMAP_THRESHOLD_=131072`` so that freed activation buffers go back to the OS and RSS follows
the live bytes (glibc otherwise keeps them in its heap; slower, so not the default).

    .venv/bin/python benchmarks/finetune.py                       # fp32 and bf16 autocast, 8 steps
    .venv/bin/python benchmarks/finetune.py --dtypes fp32 --steps 4 --seq-len 256
    .venv/bin/python benchmarks/finetune.py --dtypes fp32 --steps 3 --warmup 1 \\
        --variants lora-ckpt,qlora-nf4,qlora-nf4-ckpt,qlora-gguf,dora,ia3,prompt,houlsby
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _windows(tok: Any, seq_len: int, n: int) -> list[list[int]]:
    from slimlm.calib.data import default_text

    ids = tok.encode(default_text()[:400_000])
    return [ids[i * seq_len:(i + 1) * seq_len] for i in range(n)]


SLIMLM_VARIANTS = ["lora", "lora-ckpt", "qlora-nf4", "qlora-nf4-ckpt", "qlora-gguf", "dora", "ia3", "prompt", "houlsby"]
HF_VARIANTS = ["lora", "lora-ckpt", "dora", "ia3", "prompt"]


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_hwm() -> tuple[int, int]:
    """Reset the kernel's resident high-water mark (Linux >= 4.0) so the step peak excludes the load peak.

    Returns (the peak so far: loading, the RSS now: what the steps' activations and state grow from)."""
    from slimlm.utils.memory import peak_rss_bytes, reset_peak_rss

    load_peak = peak_rss_bytes()  # VmHWM, not ru_maxrss: that survives fork + exec (the parent's peak)
    reset_peak_rss()
    return load_peak, _rss_now()


def _step_stats(marks: tuple[int, int]) -> dict[str, int]:
    """Peak RSS of the whole process and of the training steps only, and what the steps added."""
    from slimlm.utils.memory import peak_rss_bytes

    load_peak, before = marks
    steps = peak_rss_bytes()
    return {"peak_rss_bytes": max(load_peak, steps), "load_peak_rss_bytes": load_peak, "rss_before_steps": before,
            "steps_peak_rss_bytes": steps, "activation_bytes": steps - before}


def _slimlm_method(variant: str) -> Any:
    from slimlm.peft import HoulsbyConfig, IA3Config, LoraConfig, PromptTuningConfig

    if variant.startswith(("lora", "qlora", "dora")):
        return LoraConfig(r=16, lora_alpha=32, target_modules=ALL, use_dora=variant == "dora")
    if variant == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    if variant == "prompt":
        return PromptTuningConfig(num_virtual_tokens=8)
    return HoulsbyConfig(bottleneck_size=16)


def run_slimlm(hf_dir: str, seq_len: int, steps: int, warmup: int, dtype: str, variant: str = "lora",
               gguf: str = "") -> dict[str, Any]:
    from slimlm.loaders import load_model
    from slimlm.peft import apply_peft
    from slimlm.train.config import TrainConfig
    from slimlm.train.data import Example
    from slimlm.train.loop import Trainer

    lm = load_model(gguf if variant == "qlora-gguf" else hf_dir)  # qlora-nf4: hf_dir is the saved NF4 model
    torch.manual_seed(0)
    apply_peft(lm.model, _slimlm_method(variant))
    ex = [Example(w, w) for w in _windows(lm.tokenizer, seq_len, steps + warmup)]
    cfg = TrainConfig(max_steps=steps + warmup, batch_size=1, seq_len=seq_len, lr=2e-4, max_grad_norm=0.0,
                      dtype=dtype, schedule="constant", activation_checkpointing=variant.endswith("-ckpt"))
    tr = Trainer(lm.model, cfg, ex, progress=False)
    times, loss = [], 0.0
    marks = _reset_hwm()
    for _ in range(steps + warmup):
        t = time.perf_counter()
        loss = tr.train_step()["loss"]
        times.append(time.perf_counter() - t)
    return {"tokens_per_s": seq_len * steps / sum(times[warmup:]), "loss": loss,
            **_step_stats(marks)}


def _hf_method(variant: str) -> Any:
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    if variant in ("lora", "lora-ckpt", "dora"):
        return LoraConfig(r=16, lora_alpha=32, target_modules=ALL, task_type="CAUSAL_LM", use_dora=variant == "dora")
    if variant == "ia3":
        return IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                         task_type="CAUSAL_LM")
    return PromptTuningConfig(num_virtual_tokens=8, task_type="CAUSAL_LM")


def run_hf(hf_dir: str, seq_len: int, steps: int, warmup: int, dtype: str, variant: str = "lora",
           gguf: str = "") -> dict[str, Any]:
    from tests.helpers.peft_env import hide_old_gptqmodel

    hide_old_gptqmodel()  # peft 0.21 refuses every layer beside the GPTQ oracle's old gptqmodel
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from slimlm.loaders.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    if variant == "lora-ckpt":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(0)
    model = get_peft_model(model, _hf_method(variant))
    model.train()
    wins = _windows(Tokenizer.from_hf_dir(hf_dir), seq_len, steps + warmup)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    use_bf16 = dtype == "bf16"
    times, loss = [], 0.0
    marks = _reset_hwm()
    for w in wins:
        t = time.perf_counter()
        ids = torch.tensor([w])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(out.loss)
        times.append(time.perf_counter() - t)
    return {"tokens_per_s": seq_len * steps / sum(times[warmup:]), "loss": loss,
            **_step_stats(marks)}


def _side(side: str, model_dir: str, dtype: str, variant: str, gguf: str, a: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--side", side, "--hf-dir", model_dir, "--dtype", dtype, "--variant", variant,
           "--gguf", gguf, "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup)]
    env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "131072"} if a.live_heap else {})}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{side} {variant} failed:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--variants", default="", help=f"extra rows, comma-separated: {', '.join(SLIMLM_VARIANTS[1:])}")
    ap.add_argument("--live-heap", action="store_true", help="MALLOC_MMAP_THRESHOLD_=131072 on every side")
    ap.add_argument("--out", default="benchmarks/results/finetune.json")
    ap.add_argument("--side", choices=["slimlm", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--gguf", default="", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:  # one side, in its own process
        fn = run_slimlm if a.side == "slimlm" else run_hf
        print(json.dumps(fn(a.hf_dir, a.seq_len, a.steps, a.warmup, a.dtype, a.variant, a.gguf)))
        return
    variants = ["lora", *[v for v in a.variants.split(",") if v]]
    bad = [v for v in variants if v not in SLIMLM_VARIANTS]
    if bad:
        raise SystemExit(f"error: unknown --variants {bad} (choose from {', '.join(SLIMLM_VARIANTS[1:])})")
    from slimlm.bench.sysinfo import save_json, system_info
    from slimlm.loaders import load_model
    from slimlm.loaders.resolve import resolve
    from slimlm.loaders.save import export_hf, save_model

    rows = []
    gguf = str(resolve(a.model)[0])
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(Path(tmp) / "hf")
        export_hf(load_model(a.model, dequantize=True), hf_dir)
        nf4_dir = str(Path(tmp) / "nf4")
        if any(v.startswith("qlora-nf4") for v in variants):  # quantized once, loaded quantized (as a user would)
            from slimlm.quant import NF4Config, quantize_

            lm = load_model(hf_dir)
            quantize_(lm.model, NF4Config())
            save_model(lm, nf4_dir)
            del lm
        for dtype in a.dtypes.split(","):
            for variant in variants:
                src = nf4_dir if variant.startswith("qlora-nf4") else hf_dir
                res = {"slimlm": _side("slimlm", src, dtype, variant, gguf, a)}
                if variant in HF_VARIANTS:
                    res["hf"] = _side("hf", hf_dir, dtype, variant, gguf, a)
                row: dict[str, Any] = {"dtype": dtype, "variant": variant,
                                       **{f"{s}_{k}": v for s, r in res.items() for k, v in r.items()}}
                if "hf" in res:
                    row["tokens_per_s_ratio"] = res["slimlm"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
                    row["peak_rss_ratio"] = res["slimlm"]["peak_rss_bytes"] / res["hf"]["peak_rss_bytes"]
                    row["steps_peak_rss_ratio"] = (res["slimlm"]["steps_peak_rss_bytes"]
                                                   / res["hf"]["steps_peak_rss_bytes"])
                rows.append(row)
                line = (f"{dtype} {variant}: slimlm {row['slimlm_tokens_per_s']:.0f} tok/s, "
                        f"peak {row['slimlm_peak_rss_bytes'] / 2**30:.2f} GiB, steps {row['slimlm_steps_peak_rss_bytes'] / 2**30:.2f} "
                        f"(+{row['slimlm_activation_bytes'] / 2**30:.2f})")
                if "hf" in res:
                    line += (f"; transformers+peft {row['hf_tokens_per_s']:.0f} tok/s, peak {row['hf_peak_rss_bytes'] / 2**30:.2f} GiB, "
                             f"steps {row['hf_steps_peak_rss_bytes'] / 2**30:.2f} (+{row['hf_activation_bytes'] / 2**30:.2f}); "
                             f"ratios: tokens/s x{row['tokens_per_s_ratio']:.2f}, peak RSS x{row['peak_rss_ratio']:.2f}, "
                             f"steps peak x{row['steps_peak_rss_ratio']:.2f}")
                print(line, flush=True)
    save_json({"system": system_info(), "model": a.model, "seq_len": a.seq_len, "steps": a.steps,
               "live_heap": a.live_heap, "lora": {"r": 16, "alpha": 32, "targets": ALL}, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
