"""One variant's measurements, in its own process (``python -m slimlm.bench.worker``), so its RSS is its own.

The parent (:mod:`slimlm.bench.protocol`) sends one JSON command per line on stdin and reads one JSON
reply per line from the worker's original stdout (everything else the worker prints goes to
stderr). Commands: ``load`` (model, dtype, adapter: memory and size facts), ``ppl`` (one corpus),
``round`` (one timed generation at batch 1 and one at the concurrency), ``finish`` (peak RSS, exit).
A command that fails replies ``{"ok": false, "error": "<one line>"}``; the worker keeps running.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class Worker:
    def __init__(self) -> None:
        self.lm: Any = None
        self.prompt_ids: list[int] = []
        self.n_prompt = 0

    # --- commands --------------------------------------------------------------------------------
    def load(self, spec: str, dtype: str, adapter: str | None, dequantize: bool | None, threads: int | None,
             prompt_source: str | None, prompt_tokens: int, new_tokens: int, concurrency: int) -> dict[str, Any]:
        from slimlm.loaders import describe, load_model
        from slimlm.models.kv_cache import KVCache
        from slimlm.models.transformer import Transformer
        from slimlm.utils.memory import (
            current_rss_bytes,
            peak_rss_bytes,
            release_free_memory,
            tensor_storage_nbytes,
        )

        if threads:
            torch.set_num_threads(threads)
        release_free_memory()
        rss0 = current_rss_bytes()
        lm = load_model(spec, dtype=DTYPES[dtype], dequantize=dequantize)
        if adapter:
            from slimlm.peft.adapter import load_adapter

            load_adapter(lm.model, adapter)
        self.lm = lm
        d = describe(lm)  # trims the heap first
        rss1 = current_rss_bytes()
        with torch.device("meta"):  # the logical parameter count (packed codes count as the weights they encode)
            params = Transformer(lm.config).num_parameters()
        weight_bytes = tensor_storage_nbytes(lm.model.state_dict().values())
        ctx = prompt_tokens + new_tokens
        per_token = _kv_bytes(KVCache.for_model(lm.config, 1, 1, lm.model.dtype))
        self._prompts(prompt_source, prompt_tokens, concurrency)
        return {"format": d["format"], "architecture": d["architecture"], "parameters": params,
                "weight_bytes": weight_bytes, "bits_per_weight": weight_bytes * 8 / params if params else 0.0,
                "size_on_disk_bytes": int(d["size_on_disk_bytes"] or 0),
                "memory": {"rss_before_load_bytes": rss0, "rss_after_load_bytes": rss1,
                           "load_rss_bytes": max(0, rss1 - rss0), "peak_rss_bytes": peak_rss_bytes(),
                           "tensor_bytes": int(d["tensor_bytes"]), "kv_cache_bytes_per_token": per_token,
                           "kv_cache_bytes": {"batch_1": per_token * ctx,
                                              f"batch_{concurrency}": per_token * ctx * concurrency}}}

    def _prompts(self, source: str | None, n: int, concurrency: int) -> None:
        """``concurrency`` prompts of ``n`` tokens: consecutive slices of the first corpus's text."""
        from slimlm.calib.data import read_text

        text = read_text(source)[: n * concurrency * 16 + 4096]
        tok = self.lm.tokenizer
        vocab = self.lm.config.vocab_size
        ids = tok.encode(text) if tok is not None else []
        need = n * concurrency
        if len(ids) < need:  # short text (or no tokenizer): repeat it, else count through the vocabulary
            ids = (ids * (need // len(ids) + 1)) if ids else [(7 + 13 * i) % vocab for i in range(need)]
        self.prompt_ids = ids[:need]
        self.n_prompt = n

    def ppl(self, path: str | None, seq_len: int, max_tokens: int | None) -> dict[str, Any]:
        from slimlm.calib.data import read_text
        from slimlm.eval.perplexity import evaluate_perplexity
        from slimlm.utils.errors import SlimlmError

        if self.lm.tokenizer is None:
            raise SlimlmError("the model has no tokenizer; perplexity needs one")
        ids = self.lm.tokenizer.encode(read_text(path))
        r = evaluate_perplexity(self.lm.model, ids, seq_len=min(seq_len, self.lm.config.max_position_embeddings),
                                max_tokens=max_tokens, progress=False)
        return {k: v for k, v in r.to_dict().items() if k != "tokens_per_s"}

    def round(self, new_tokens: int, concurrency: int) -> dict[str, float]:
        from slimlm.bench.timing import time_generation

        n = self.n_prompt
        one = time_generation(self.lm.model, self.lm.tokenizer, [self.prompt_ids[:n]], new_tokens)
        out = {"prefill_tok_s": one["prefill_tok_s"], "ttft_s": one["ttft_s"], "decode_tok_s": one["decode_tok_s"]}
        if concurrency > 1:
            prompts = [self.prompt_ids[i * n:(i + 1) * n] for i in range(concurrency)]
            many = time_generation(self.lm.model, self.lm.tokenizer, prompts, new_tokens)
            out["decode_tok_s_concurrent"] = many["decode_tok_s"]
        return out

    def finish(self) -> dict[str, Any]:
        from slimlm.utils.memory import current_rss_bytes, peak_rss_bytes

        return {"peak_rss_bytes": peak_rss_bytes(), "rss_bytes": current_rss_bytes()}


def _kv_bytes(cache: Any) -> int:
    return int(cache.k.numel() * cache.k.element_size() + cache.v.numel() * cache.v.element_size())


def one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__


def main() -> int:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # prints (and C++ output) go to stderr
    w = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        cmd = msg.pop("cmd")
        try:
            reply = {"ok": True, "result": getattr(w, cmd)(**msg)}
        except Exception as e:  # any failure is this variant's, reported in one line; the worker goes on
            if os.environ.get("SLIMLM_DEBUG") == "1":
                traceback.print_exc()
            reply = {"ok": False, "error": one_line(e)}
        out.write(json.dumps(reply) + "\n")
        out.flush()
        if cmd == "finish":
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
