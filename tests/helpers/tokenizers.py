"""Tiny real tokenizers for tests: a byte-level BPE trained offline on Python's own documentation.

Why: tests need a real tokenizer (merges, special tokens, a chat template) to build tiny HF model
folders and GGUF files, without downloading anything. Training on ``pydoc_data.topics`` (shipped
with the standard library) takes well under a second and is cached per vocabulary size.

Example:
    tok = make_tiny_tokenizer(vocab_size=320)   # slimlm Tokenizer, ids 0..2 are special
    tok.save(model_dir)                         # transformers.AutoTokenizer can read it back
"""

from __future__ import annotations

from functools import lru_cache
from pydoc_data.topics import topics

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from slimlm.loaders.tokenizer import Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def training_text() -> list[str]:
    """The documentation topics, one string each (about 0.8 MB of English + code)."""
    return [topics[k] for k in sorted(topics)]


@lru_cache(maxsize=8)
def _train(vocab_size: int) -> str:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_text(), trainer=trainer)
    return tok.to_str()


def make_tiny_tokenizer(vocab_size: int = 384, chat_template: str | None = CHATML_TEMPLATE) -> Tokenizer:
    """A byte-level BPE tokenizer with ``vocab_size`` ids (>= 259), ChatML special tokens and template.

    ``<|endoftext|>`` (0) is BOS/pad/unk-free, ``<|im_end|>`` (2) is EOS, like SmolLM2.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)} for a byte-level BPE")
    backend = tokenizers.Tokenizer.from_str(_train(vocab_size))
    special = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
               "unk_token": "<|endoftext|>"}
    return Tokenizer(backend, special_tokens=special, add_bos_token=False, chat_template=chat_template)
