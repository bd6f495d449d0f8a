"""Run llama.cpp's own ``llama-perplexity`` on a GGUF file and read back its log-probabilities.

``llama-perplexity -f TEXT -c N --kl-divergence-base FILE`` tokenizes TEXT with llama.cpp's tokenizer,
splits it into chunks of N tokens (the first token of each chunk replaced by BOS when the vocabulary
adds one), scores positions N/2 .. N-2 of each chunk (predicting tokens N/2+1 .. N-1) and saves:
``"_logits_"``, int32 n_ctx, int32 n_vocab, int32 n_chunk, int32 tokens [n_chunk*n_ctx], then per scored
position ``2*((n_vocab+1)//2) + 4`` uint16: float32 scale, float32 min_log_prob, and each vocabulary
entry's log-probability as ``min_log_prob + code*scale`` (code 0: more than 16 nats below the top, not
kept). So the file gives llama.cpp's log-softmax to within ``scale/2 <= 16/65535/2`` (1.2e-4 nats),
and the exact token ids it ran on, which :func:`slimlm_log_probs` feeds to slimlm the same way.
llama.cpp's perplexity is recomputed from the file (its printed "Final estimate" and the last running
values are sometimes lost when the process exits before its log thread flushes).

The binary: ``$SLIMLM_LLAMA_CPP_BIN`` (the folder holding ``llama-perplexity``, or the file), else
``/work/llama.cpp/build/bin``, else ``llama-perplexity`` on PATH.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

KNOWN_BIN = Path("/work/llama.cpp/build/bin")


def find_perplexity_bin() -> Path | None:
    env = os.environ.get("SLIMLM_LLAMA_CPP_BIN")
    for cand in ([Path(env)] if env else []) + [KNOWN_BIN]:
        exe = cand / "llama-perplexity" if cand.is_dir() else cand
        if exe.is_file() and os.access(exe, os.X_OK):
            return exe
    found = shutil.which("llama-perplexity")
    return Path(found) if found else None


@dataclass
class LlamaCppRun:
    n_ctx: int
    tokens: np.ndarray  # int32 [n_chunk, n_ctx] as tokenized (before the BOS replacement)
    log_probs: np.ndarray  # float32 [n_chunk, n_ctx/2 - 1, n_vocab]; -inf where not kept


def run_perplexity(exe: Path, gguf: Path, text: Path, n_ctx: int, out_dir: Path, threads: int = 2,
                   chunks: int = -1) -> LlamaCppRun:
    logits_file = out_dir / "llamacpp-logits.bin"
    cmd = [str(exe), "-m", str(gguf), "-f", str(text), "-c", str(n_ctx), "-b", str(n_ctx), "-t", str(threads),
           "-ctk", "f32", "-ctv", "f32", "--chunks", str(chunks), "--kl-divergence-base", str(logits_file)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise AssertionError(f"llama-perplexity failed ({res.returncode}):\n{log[-3000:]}")

    raw = logits_file.read_bytes()
    assert raw[:8] == b"_logits_"
    n_ctx_f, n_vocab, n_chunk = np.frombuffer(raw, dtype=np.int32, count=3, offset=8)
    assert n_ctx_f == n_ctx
    off = 8 + 12
    tokens = np.frombuffer(raw, dtype=np.int32, count=n_chunk * n_ctx, offset=off).reshape(n_chunk, n_ctx)
    off += tokens.nbytes
    nv = 2 * ((n_vocab + 1) // 2) + 4
    n_scored = n_ctx - 1 - n_ctx // 2
    rec = np.frombuffer(raw, dtype=np.uint16, count=n_chunk * n_scored * nv, offset=off).reshape(n_chunk, n_scored, nv)
    head = np.ascontiguousarray(rec[..., :4]).view(np.float32)  # [chunk, pos, 2]: scale, min_log_prob
    codes = rec[..., 4 : 4 + n_vocab].astype(np.float32)
    lp = head[..., 1:2] + codes * head[..., 0:1]
    lp[codes == 0] = -np.inf
    return LlamaCppRun(int(n_ctx), tokens.copy(), lp)


def slimlm_log_probs(model: torch.nn.Module, run: LlamaCppRun, bos_id: int | None) -> torch.Tensor:
    """slimlm's log-softmax at the positions llama-perplexity scored: [n_chunk, n_ctx/2 - 1, n_vocab]."""
    first = run.n_ctx // 2
    ids = torch.from_numpy(run.tokens.astype(np.int64))
    if bos_id is not None:
        ids[:, 0] = bos_id
    with torch.no_grad():
        logits = model(ids).float()  # [n_chunk, n_ctx, vocab]
    return torch.log_softmax(logits[:, first : run.n_ctx - 1], dim=-1)


def compare(ours: torch.Tensor, run: LlamaCppRun) -> dict[str, float]:
    """Max |log p| difference over the entries llama.cpp kept, argmax agreement, and both perplexities
    over the scored targets llama.cpp kept (all of them for a trained model)."""
    theirs = torch.from_numpy(run.log_probs)
    kept = torch.isfinite(theirs)
    diff = (ours - theirs).abs()[kept].max().item()
    ids = torch.from_numpy(run.tokens.astype(np.int64))[:, run.n_ctx // 2 + 1 :].unsqueeze(-1)  # targets
    lp_cpp = theirs.gather(-1, ids)
    ok = torch.isfinite(lp_cpp)  # targets more than 16 nats below the top are not in the file
    lp_ours = ours.gather(-1, ids)[ok]
    nll, nll_cpp = -lp_ours.mean().item(), -lp_cpp[ok].mean().item()
    target_diff = (lp_ours - lp_cpp[ok]).abs()
    same = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return {"max_abs_logprob_diff": diff, "max_abs_target_logprob_diff": target_diff.max().item(),
            "mean_abs_target_logprob_diff": target_diff.mean().item(), "ppl_slimlm": float(np.exp(nll)),
            "ppl_llamacpp": float(np.exp(nll_cpp)), "argmax_agreement": same, "tokens_scored": int(ok.sum())}
