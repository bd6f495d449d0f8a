"""LoRA fine-tuning speed and memory: slimlm's trainer vs transformers + peft, same model, data, dtype.

SmolLM2-135M (the ``smollm2-135m`` alias, de-quantized to float for both sides: transformers loads
slimlm's HF export of it), LoRA r=16 / alpha 32 on all seven attention and MLP linears, AdamW
lr 2e-4, batch 1 x ``--seq-len`` tokens of the same text windows, the same number of steps. Each
side runs in its own subprocess (peak RSS is per process); the first ``--warmup`` steps are not
timed. Reported: tokens/s, peak RSS and the last loss per side, and slimlm / transformers ratios
(only ratios mean anything on a shared machine).

    .venv/bin/python benchmarks/finetune.py                       # fp32 and bf16 autocast, 8 steps
    .venv/bin/python benchmarks/finetune.py --dtypes fp32 --steps 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import json
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


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_slimlm(hf_dir: str, seq_len: int, steps: int, warmup: int, dtype: str) -> dict[str, Any]:
    from slimlm.loaders import load_model
    from slimlm.peft import LoraConfig, apply_peft
    from slimlm.train.config import TrainConfig
    from slimlm.train.data import Example
    from slimlm.train.loop import Trainer

    lm = load_model(hf_dir)
    torch.manual_seed(0)
    apply_peft(lm.model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL))
    ex = [Example(w, w) for w in _windows(lm.tokenizer, seq_len, steps + warmup)]
    cfg = TrainConfig(max_steps=steps + warmup, batch_size=1, seq_len=seq_len, lr=2e-4, max_grad_norm=0.0,
                      dtype=dtype, schedule="constant")
    tr = Trainer(lm.model, cfg, ex, progress=False)
    times, loss = [], 0.0
    for _ in range(steps + warmup):
        t = time.perf_counter()
        loss = tr.train_step()["loss"]
        times.append(time.perf_counter() - t)
    return {"tokens_per_s": seq_len * steps / sum(times[warmup:]), "peak_rss_bytes": _peak_rss(), "loss": loss}


def run_hf(hf_dir: str, seq_len: int, steps: int, warmup: int, dtype: str) -> dict[str, Any]:
    from tests.helpers.peft_env import hide_old_gptqmodel

    hide_old_gptqmodel()  # peft 0.21 refuses every layer beside the GPTQ oracle's old gptqmodel
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from slimlm.loaders.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=ALL, task_type="CAUSAL_LM"))
    model.train()
    wins = _windows(Tokenizer.from_hf_dir(hf_dir), seq_len, steps + warmup)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    use_bf16 = dtype == "bf16"
    times, loss = [], 0.0
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
    return {"tokens_per_s": seq_len * steps / sum(times[warmup:]), "peak_rss_bytes": _peak_rss(), "loss": loss}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--out", default="benchmarks/results/finetune.json")
    ap.add_argument("--side", choices=["slimlm", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--hf-dir", help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.side:  # one side, in its own process
        fn = run_slimlm if a.side == "slimlm" else run_hf
        print(json.dumps(fn(a.hf_dir, a.seq_len, a.steps, a.warmup, a.dtype)))
        return
    from slimlm.bench.sysinfo import save_json, system_info
    from slimlm.loaders import load_model
    from slimlm.loaders.save import export_hf

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = str(Path(tmp) / "hf")
        export_hf(load_model(a.model, dequantize=True), hf_dir)
        for dtype in a.dtypes.split(","):
            res = {}
            for side in ("slimlm", "hf"):
                cmd = [sys.executable, __file__, "--side", side, "--hf-dir", hf_dir, "--dtype", dtype,
                       "--seq-len", str(a.seq_len), "--steps", str(a.steps), "--warmup", str(a.warmup)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                res[side] = json.loads(out.stdout.strip().splitlines()[-1])
            row = {"dtype": dtype, **{f"{s}_{k}": v for s, r in res.items() for k, v in r.items()},
                   "tokens_per_s_ratio": res["slimlm"]["tokens_per_s"] / res["hf"]["tokens_per_s"],
                   "peak_rss_ratio": res["slimlm"]["peak_rss_bytes"] / res["hf"]["peak_rss_bytes"]}
            rows.append(row)
            print(f"{dtype}: slimlm {row['slimlm_tokens_per_s']:.0f} tok/s, {row['slimlm_peak_rss_bytes'] / 2**30:.2f} GiB; "
                  f"transformers+peft {row['hf_tokens_per_s']:.0f} tok/s, {row['hf_peak_rss_bytes'] / 2**30:.2f} GiB; "
                  f"ratios: tokens/s x{row['tokens_per_s_ratio']:.2f}, peak RSS x{row['peak_rss_ratio']:.2f}")
    save_json({"system": system_info(), "model": a.model, "seq_len": a.seq_len, "steps": a.steps,
               "lora": {"r": 16, "alpha": 32, "targets": ALL}, "rows": rows}, a.out)


if __name__ == "__main__":
    main()
