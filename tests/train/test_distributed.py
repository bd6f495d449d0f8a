"""Data-parallel training (DDP and FSDP2 over gloo, 2 ranks started by torchrun) = one process.

Oracle: the single-process loop (itself checked against transformers in test_loop.py) with the same
global batch: 2 ranks x ``--batch-size 2`` against one process with ``--batch-size 4``, same data order
and grad accumulation. After 3 AdamW steps the trained tensors (LoRA adapters in peft's layout, or
the full model's HF folder) agree to 1e-4 of each tensor's largest magnitude (fp32; what differs is
only the order of float sums: per-rank partial sums, then the all-reduce). Adam's update is nearly
blind to the gradient's scale, so the logged loss and global gradient norm of every step are
compared too (1e-5 relative): a missing world-size factor or a per-rank token count would change
them. The final eval loss (held-out quarter of the data) agrees to 1e-5 relative. Resume: an FSDP run
continued from its step-2 checkpoint ends bit for bit where the uninterrupted run ended, and one
process continues the 2-rank checkpoint to the single-process result. Only rank 0 writes (one
metrics row per step).

The five distributed runs (DDP and FSDP, each LoRA and full fine-tuning, plus a resume) share one torchrun launch (tests/train/dist_worker.py): start-up is most
of the cost. Bad input (``--distributed`` without torchrun, unsupported optimizer, a quantized base
under FSDP, torchrun without ``--distributed``) is one line, exit 2.

Run: ``.venv/bin/python -m pytest tests/train/test_distributed.py``
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from slimlm.cli.main import main
from slimlm.train.distributed import Dist
from slimlm.utils.errors import SlimlmError
from tests.helpers.models import make_hf_model
from tests.helpers.server import free_port
from tests.helpers.tokenizers import make_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")
TRAIN = ["--max-steps", "3", "--seq-len", "64", "--lr", "0.01", "--train-dtype", "fp32", "--no-progress",
         "--grad-accum", "2", "--max-grad-norm", "0.5", "--save-every", "2", "--warmup-steps", "1", "--eval-fraction", "0.25"]
RECORDS = [{"prompt": f"Question {i}: what is {i} plus {i}?\nAnswer: ", "completion": f"It is {2 * i}" + "!" * i}
           for i in range(16)]
METHODS = {"lora": ["--method", "lora", "--lora-alpha", "8"], "full": ["--full"]}
RUNS = {f"{mode}-{method}": ["--distributed", mode, *METHODS[method]] for mode in ("ddp", "fsdp") for method in METHODS}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("dist")
    make_hf_model("llama", d / "m", vocab_size=384)
    make_tiny_tokenizer(384).save(d / "m")
    (d / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    return d


def _args(d: Path, name: str, extra: list[str], batch: int, **kw: str) -> list[str]:
    out = ["finetune", str(d / "m"), "--data", str(d / "d.jsonl"), "--out", str(d / name), "--batch-size", str(batch),
           *TRAIN, *extra]
    for k, v in kw.items():
        out += [f"--{k.replace('_', '-')}", v]
    return out


@pytest.fixture(scope="module")
def runs(setup):  # type: ignore[no-untyped-def]
    """Every distributed run in one torchrun launch, then the single-process references."""
    d = setup
    argvs = [_args(d, f"{n}-2rank", extra, 2) for n, extra in RUNS.items()]
    # FSDP resume: continue fsdp-lora from its step-2 checkpoint, to the same 3 steps
    argvs.append(_args(d, "fsdp-lora-resumed", RUNS["fsdp-lora"], 2, resume=str(d / "fsdp-lora-2rank.ckpt/step-000002"),
                       checkpoint_dir=str(d / "resumed.ckpt")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLIMLM_KERNELS": "0", "PYTHONPATH": str(ROOT),
           "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKER), json.dumps(argvs)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for method, extra in METHODS.items():  # the oracle: one process, the same global batch
        assert main(_args(d, f"{method}-1proc", extra, 4)) == 0
    return d


def _trained(folder: Path) -> dict[str, torch.Tensor]:
    f = folder / "adapter_model.safetensors"
    return load_file(str(f if f.is_file() else folder / "model.safetensors"))


def _rows(ckpt: Path) -> tuple[list[dict], float]:  # type: ignore[type-arg]
    """The metrics log's step rows and the final eval loss."""
    rows = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines()]
    assert "eval_loss" in rows[-1]
    return [r for r in rows if "loss" in r], float(rows[-1]["eval_loss"])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RUNS))
def test_two_ranks_train_what_one_process_trains(runs, name):
    method = name.split("-")[1]
    one, two = _trained(runs / f"{method}-1proc"), _trained(runs / f"{name}-2rank")
    assert set(one) == set(two) and one
    worst = max(float((one[k] - two[k]).abs().max() / one[k].abs().max().clamp_min(1e-12)) for k in one)
    assert worst < 1e-4, f"{name}: trained tensors differ by {worst:.2e} of their largest magnitude"
    start = _trained(runs / "m") if method == "full" else None
    if start is not None:  # the full run really trained every weight it saved
        assert all(not torch.equal(start[k], one[k]) for k in one if k in start)
    (r1, ev1), (r2, ev2) = _rows(runs / f"{method}-1proc.ckpt"), _rows(runs / f"{name}-2rank.ckpt")
    assert [r["step"] for r in r2] == [1, 2, 3]  # rank 0 alone logs
    assert ev2 == pytest.approx(ev1, rel=1e-5)  # the held-out loss of the trained model
    for a, b in zip(r1, r2, strict=True):
        assert a["tokens"] == b["tokens"] and a["target_tokens"] == b["target_tokens"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


@pytest.mark.slow
def test_fsdp_resume_is_bit_exact(runs):
    straight, resumed = _trained(runs / "fsdp-lora-2rank"), _trained(runs / "fsdp-lora-resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [r["step"] for r in _rows(runs / "resumed.ckpt")[0]] == [3]


@pytest.mark.slow
def test_a_two_rank_checkpoint_resumes_in_one_process(runs):
    # the checkpoint holds full tensors and the global data position: one process with the same global
    # batch continues it to what the single-process run reached
    assert main(_args(runs, "from-2rank-1proc", METHODS["lora"], 4, resume=str(runs / "fsdp-lora-2rank.ckpt/step-000002"),
                      checkpoint_dir=str(runs / "from-2rank.ckpt"))) == 0
    one, cont = _trained(runs / "lora-1proc"), _trained(runs / "from-2rank-1proc")
    assert max(float((one[k] - cont[k]).abs().max() / one[k].abs().max()) for k in one) < 1e-4


def test_bad_distributed_input_is_one_line(setup, capsys, monkeypatch):
    d = setup
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    cases = [(["--distributed", "ddp"], "needs a torchrun launch"),
             (["--distributed", "fsdp", "--optimizer", "adafactor"], "--distributed fsdp with --optimizer adafactor"),
             (["--distributed", "ddp", "--optimizer", "lomo"], "--distributed ddp with --optimizer lomo")]
    for extra, msg in cases:
        assert main(_args(d, "bad", extra, 2)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(_args(d, "bad", [], 2)) == 2
    assert "--distributed is none" in capsys.readouterr().err
    assert not (d / "bad").exists() and not (d / "bad.ckpt").exists()


def test_fsdp_refuses_a_quantized_base():
    m = nn.Module()
    m.codes = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)
    with pytest.raises(SlimlmError, match="int8"):
        Dist("fsdp", 0, 2).wrap(m)
