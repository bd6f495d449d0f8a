"""Training data: text files, prompt/completion and chat JSONL -> tokenized examples -> packed windows.

Each example is ``(ids, labels)``: ``labels[i]`` is ``ids[i]`` where the loss counts (completion or
assistant tokens, every token of plain text) and ``-100`` where it does not (prompts, system and
user turns, the chat template's own markup). Examples are packed greedily into windows of
``seq_len`` tokens; a window records each example as a segment (``segment_ids``) with positions that
restart at 0, and the model's forward makes attention block-diagonal over segments
(``Transformer.forward(segment_ids=...)``), so packed examples never see each other. The first token
of a segment is never a target (it would be predicted from the previous segment).

Sources (``read_examples(spec, tokenizer, ...)``):

- ``builtin:instruct``: the project's small instruction set (``slimlm/data/instruct.jsonl``).
- ``*.jsonl``: one JSON object per line, ``{"prompt", "completion"}`` or ``{"messages": [...]}``
  (rendered with the tokenizer's chat template) or ``{"text"}``; a bad line is an error naming
  ``file:line`` or, with ``on_bad_line="skip"``, is skipped and counted.
- anything else: plain UTF-8 text, cut into consecutive windows, every token a target.

Example::

    examples = read_examples("builtin:instruct", lm.tokenizer, seq_len=256)
    windows = pack(examples, seq_len=256)
    batch = collate(windows[:4])  # input_ids/labels/positions/segment_ids [4, 256]
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from slimlm.utils.errors import SlimlmError

IGNORE = -100  # label of a token the loss skips (torch's cross_entropy ignore_index default)
BUILTIN = {"instruct": "instruct.jsonl"}


@dataclass
class Example:
    ids: list[int]
    labels: list[int]  # same length; IGNORE where the loss does not count


@dataclass
class Window:
    """One training row of at most ``seq_len`` tokens holding one or more whole examples."""

    ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)


@dataclass
class DataStats:
    examples: int = 0
    skipped_lines: int = 0
    truncated: int = 0
    target_tokens: int = 0


# --- reading -------------------------------------------------------------------------------------
def resolve_data(spec: str) -> Path:
    """``builtin:NAME`` -> the packaged file; else the path, which must exist."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        if name not in BUILTIN:
            raise SlimlmError(f"unknown built-in dataset {spec!r}; known: {', '.join('builtin:' + k for k in BUILTIN)}")
        return Path(str(resources.files("slimlm.data").joinpath(BUILTIN[name])))
    p = Path(spec)
    if not p.is_file():
        raise SlimlmError(f"data file not found: {p}")
    return p


def read_examples(spec: str, tokenizer: Any, seq_len: int, on_bad_line: str = "error",
                  stats: DataStats | None = None) -> list[Example]:
    """Tokenized examples of a data file (see module docstring); ``stats`` collects counts."""
    if tokenizer is None:
        raise SlimlmError("this model has no tokenizer: training data cannot be tokenized")
    path = resolve_data(spec)
    stats = stats if stats is not None else DataStats()
    if path.suffix == ".jsonl":
        out = _read_jsonl(path, tokenizer, on_bad_line, stats)
    else:
        out = text_windows(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")), seq_len)
    kept = []
    for ex in out:
        if len(ex.ids) > seq_len:
            ex = Example(ex.ids[:seq_len], ex.labels[:seq_len])
            stats.truncated += 1
        if any(t != IGNORE for t in ex.labels[1:]):
            kept.append(ex)
    if not kept:
        raise SlimlmError(f"{path}: no example with a token to learn from (all prompt, or empty)")
    stats.examples = len(kept)
    stats.target_tokens = sum(sum(t != IGNORE for t in e.labels[1:]) for e in kept)
    return kept


def text_windows(ids: list[int], seq_len: int) -> list[Example]:
    """Plain text: consecutive windows of ``seq_len`` tokens (the last, shorter one kept if > 1 token)."""
    return [Example(ids[i:i + seq_len], ids[i:i + seq_len]) for i in range(0, len(ids), seq_len)
            if len(ids[i:i + seq_len]) > 1]


def _read_jsonl(path: Path, tokenizer: Any, on_bad_line: str, stats: DataStats) -> list[Example]:
    out: list[Example] = []
    for n, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise SlimlmError(f"not JSON ({e.msg} at column {e.colno})") from None
            out.append(encode_record(obj, tokenizer))
        except NoChatTemplateError:
            raise
        except SlimlmError as e:
            if on_bad_line == "skip":
                stats.skipped_lines += 1
                continue
            raise SlimlmError(f"{path}:{n}: {e}") from None
    return out


class NoChatTemplateError(SlimlmError):
    """Chat records for a tokenizer without a chat template: a property of the model, not of one line
    (never skipped, reported without a line number)."""

    def __init__(self) -> None:
        super().__init__("chat data ({\"messages\": [...]}) needs a chat template, and this model's tokenizer has "
                         "none: use {\"prompt\", \"completion\"} records or a model with a chat template")


def encode_record(obj: Any, tokenizer: Any) -> Example:
    """One JSONL record -> an example; a missing or mistyped field raises a one-line SlimlmError."""
    if not isinstance(obj, dict):
        raise SlimlmError(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return _chat(obj["messages"], tokenizer)
    if "prompt" in obj or "completion" in obj:
        prompt, completion = obj.get("prompt"), obj.get("completion")
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise SlimlmError('a record needs both "prompt" and "completion" as strings')
        p = tokenizer.encode(prompt, add_bos=bool(tokenizer.add_bos_token))
        c = tokenizer.encode(completion)
        eos = tokenizer.eos_token_id
        c = c + ([eos] if eos is not None else [])
        return Example(p + c, [IGNORE] * len(p) + c)
    if isinstance(obj.get("text"), str):
        ids = tokenizer.encode(obj["text"], add_bos=bool(tokenizer.add_bos_token))
        return Example(ids, list(ids))
    raise SlimlmError('a record needs "prompt" + "completion", "messages" or "text"; it has: '
                      + (", ".join(sorted(obj)) or "no keys"))


def _chat(messages: Any, tokenizer: Any) -> Example:
    """Render a conversation with the chat template, learning only the assistant turns' tokens.

    The template is rendered for growing prefixes of the conversation; the text an assistant turn
    adds after the generation prompt is a target, everything else (system/user turns, the template's
    markup and generation prompt) is context. Each piece is tokenized on its own, so special tokens
    at the boundaries stay whole."""
    if not tokenizer.chat_template:
        raise NoChatTemplateError()
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise SlimlmError('"messages" must be a non-empty list of {"role": str, "content": str}')
    if not any(m["role"] == "assistant" for m in messages):
        raise SlimlmError("a conversation needs at least one assistant message to learn from")
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for i, m in enumerate(messages):
        full = tokenizer.apply_chat_template(messages[: i + 1], add_generation_prompt=False)
        if m["role"] == "assistant":
            prompted = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
            if not prompted.startswith(done) or not full.startswith(prompted):
                raise SlimlmError("the chat template does not render a conversation as a prefix of its continuation; "
                                  "train on {\"prompt\", \"completion\"} records instead")
            ctx = tokenizer.encode(prompted[len(done):])
            tgt = tokenizer.encode(full[len(prompted):])
            ids += ctx + tgt
            labels += [IGNORE] * len(ctx) + tgt
        else:
            if not full.startswith(done):
                raise SlimlmError("the chat template does not render a conversation as a prefix of its continuation; "
                                  "train on {\"prompt\", \"completion\"} records instead")
            ctx = tokenizer.encode(full[len(done):])
            ids += ctx
            labels += [IGNORE] * len(ctx)
        done = full
    return Example(ids, labels)


# --- windows and batches -------------------------------------------------------------------------
def pack(examples: list[Example], seq_len: int, packing: bool = True) -> list[Window]:
    """Greedy packing in order: an example that does not fit the current window starts a new one
    (examples are never split). ``packing=False``: one example per window."""
    out: list[Window] = []
    cur = Window()
    for ex in examples:
        if cur.ids and (not packing or len(cur.ids) + len(ex.ids) > seq_len):
            out.append(cur)
            cur = Window()
        seg = cur.segments[-1] + 1 if cur.segments else 0
        cur.ids += ex.ids
        cur.labels += [IGNORE] + ex.labels[1:]  # a segment's first token is never a target
        cur.positions += list(range(len(ex.ids)))
        cur.segments += [seg] * len(ex.ids)
    if cur.ids:
        out.append(cur)
    return out


def collate(windows: list[Window], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Windows -> right-padded tensors ``[B, T]`` (T = the longest window): ``input_ids``, ``labels``
    (IGNORE on padding), ``positions``, ``segment_ids`` (padding gets segment -1) and
    ``attention_mask``; ``packed`` (a 0-d bool) says whether any window holds several segments."""
    t = max(len(w.ids) for w in windows)
    b = len(windows)
    ids = torch.full((b, t), pad_id, dtype=torch.long)
    labels = torch.full((b, t), IGNORE, dtype=torch.long)
    pos = torch.zeros((b, t), dtype=torch.long)
    seg = torch.full((b, t), -1, dtype=torch.long)
    for i, w in enumerate(windows):
        n = len(w.ids)
        ids[i, :n] = torch.tensor(w.ids)
        labels[i, :n] = torch.tensor(w.labels)
        pos[i, :n] = torch.tensor(w.positions)
        seg[i, :n] = torch.tensor(w.segments)
    return {"input_ids": ids, "labels": labels, "positions": pos, "segment_ids": seg,
            "attention_mask": (seg >= 0).long(), "packed": torch.tensor(bool((seg > 0).any()))}


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens a batch's loss counts (targets are labels[:, 1:])."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


class WindowSampler:
    """Windows in a fresh seeded order each epoch; the position (epoch, index) is all resume needs."""

    def __init__(self, windows: list[Window], batch_size: int, seed: int, shuffle: bool = True) -> None:
        if not windows:
            raise SlimlmError("no training windows")
        self.windows, self.batch_size, self.seed, self.shuffle = windows, batch_size, seed, shuffle
        self.epoch, self.index = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.windows)))
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return torch.randperm(len(self.windows), generator=g).tolist()

    def next_batch(self) -> list[Window]:
        out: list[Window] = []
        while len(out) < self.batch_size:
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._make_order()
            out.append(self.windows[self._order[self.index]])
            self.index += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "windows": len(self.windows)}

    def load_state_dict(self, s: dict[str, int]) -> None:
        if int(s["windows"]) != len(self.windows):
            raise SlimlmError(f"the checkpoint was taken on data with {s['windows']} training windows, this data has "
                              f"{len(self.windows)}: resume with the same --data and --seq-len")
        self.epoch, self.index = int(s["epoch"]), int(s["index"])
        self._order = self._make_order()
