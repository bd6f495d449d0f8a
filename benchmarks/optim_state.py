"""Optimizer-state bytes and step time per optimizer, for full fine-tuning of SmolLM2-135M's parameters.

Why: issue 19 items 3 and 7. What each optimizer keeps resident per trainable parameter decides whether
full fine-tuning fits; the bytes are exact (summed ``nbytes`` of every tensor in ``optimizer.state``,
scales and projectors included, after the first step has created them), the times are indicative.

The parameters are fp32 tensors with the shapes of the runtime model built from the GGUF's config
(``--model``, default the offline alias ``smollm2-135m``; built on the meta device, tied head counted
once), filled with random values, with random gradients: an optimizer's state and step cost depend on
shapes, not on the weights. Step time = median over ``--steps`` steps after one warm-up step (state
creation; GaLore's first SVD is reported separately as ``first_step_s``). LOMO has no ``step()`` work:
its fused update runs inside backward, timed here by calling that update for every parameter.

Run::

    .venv/bin/python benchmarks/optim_state.py --out benchmarks/results/optim_state.json
    .venv/bin/python benchmarks/optim_state.py --only adamw,adamw8bit --steps 2
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from slimlm.bench.sysinfo import save_json, system_info  # noqa: E402
from slimlm.train.optim import build_optimizer  # noqa: E402

# name -> build kwargs (each optimizer's usual fine-tuning settings; GaLore: the paper's r=128, T=200)
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adamw": {"lr": 1e-5},
    "adafactor": {"lr": 1e-2},
    "lion": {"lr": 1e-6, "weight_decay": 0.1},
    "came": {"lr": 2e-4},
    "adamw8bit": {"lr": 1e-5},
    "lomo": {"lr": 1e-3},
    "galore": {"lr": 1e-5, "rank": 128, "update_proj_gap": 200, "scale": 0.25},
}


def model_shapes(spec: str) -> dict[str, tuple[int, ...]]:
    """name -> shape of every trainable parameter of the runtime model of ``spec`` (a GGUF / alias)."""
    from slimlm.loaders.gguf_reader import read_gguf
    from slimlm.loaders.resolve import resolve
    from slimlm.models.config import ModelConfig
    from slimlm.models.transformer import Transformer

    path, kind = resolve(spec)
    if kind != "gguf":
        raise SystemExit(f"--model must be a GGUF file or alias, got {spec} ({kind})")
    config = ModelConfig.from_hf(read_gguf(path, with_tokenizer=False, native=True).config)
    with torch.device("meta"):
        model = Transformer(config)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    if model.ties_lm_head():
        shapes.pop("lm_head.weight", None)
    return shapes


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(v.nbytes for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor))


def _update(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> None:
    if getattr(opt, "updates_in_backward", False):  # LOMO: what backward's hooks would run, per parameter
        for group in opt.param_groups:
            hook = opt._hook(group)  # type: ignore[attr-defined]
            for p in group["params"]:
                hook(p)
        opt.step()
    else:
        opt.step()


def bench_one(name: str, params: list[torch.nn.Parameter], grads: list[torch.Tensor], steps: int) -> dict[str, Any]:
    model = torch.nn.Module()
    model.params = torch.nn.ParameterList(params)
    opt = build_optimizer(name, params, **OPTIMIZERS[name])
    if getattr(opt, "updates_in_backward", False):
        opt.attach(model)  # type: ignore[attr-defined]
    times = []
    for i in range(steps + 1):
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        t0 = time.perf_counter()
        _update(opt, params)
        times.append(time.perf_counter() - t0)
        if i == 0:
            nbytes = state_bytes(opt)
    n = sum(p.numel() for p in params)
    if hasattr(opt, "detach"):
        opt.detach()
    return {"state_bytes": nbytes, "state_bytes_per_param": nbytes / n, "first_step_s": times[0],
            "step_s": statistics.median(times[1:]) if steps else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--only", default=",".join(OPTIMIZERS), help="comma-separated optimizer names")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up step")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "optim_state.json"))
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown:
        raise SystemExit(f"unknown optimizer(s) {unknown}; known: {', '.join(OPTIMIZERS)}")
    shapes = model_shapes(args.model)
    n_params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"{args.model}: {len(shapes)} trainable tensors, {n_params / 1e6:.1f} M parameters (fp32, full fine-tuning)",
          flush=True)
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen) * 0.02 for s in shapes.values()]
    grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes.values()]
    results: dict[str, Any] = {}
    for name in names:
        params = [torch.nn.Parameter(w.clone()) for w in start]  # every optimizer starts from the same weights
        results[name] = bench_one(name, params, grads, args.steps)
        print(f"  {name}: {results[name]}", flush=True)
        save_json({"model": args.model, "partial": True, "results": results, "system": system_info()}, args.out)
        del params
        gc.collect()
    base = results.get("adamw", {}).get("state_bytes")
    print(f"{'optimizer':<10} {'state MB':>9} {'B/param':>8} {'vs AdamW':>9} {'first step s':>13} {'step s':>8}")
    for name, r in results.items():
        ratio = r["state_bytes"] / base if base else float("nan")
        r["vs_adamw"] = ratio
        step = f"{r['step_s']:8.3f}" if r["step_s"] is not None else f"{'-':>8}"
        print(f"{name:<10} {r['state_bytes'] / 1e6:9.1f} {r['state_bytes_per_param']:8.3f} {ratio:9.3f} "
              f"{r['first_step_s']:13.3f} {step}")
    out = {"model": args.model, "n_params": n_params, "param_dtype": "float32", "steps": args.steps,
           "optimizers": {n: OPTIMIZERS[n] for n in names}, "results": results, "system": system_info()}
    print(f"wrote {save_json(out, args.out)}")


if __name__ == "__main__":
    main()
