"""Multi-LoRA serving: many peft-format LoRA adapters resident on one model, chosen per token.

Why: a server runs one ragged batch per step, flattened into one ``[1, N]`` row of tokens
(:mod:`slimlm.engine.runner`); requests of different adapters (and of the base model) share that
step. Each linear some resident adapter targets is wrapped once in a :class:`ServedLoraLinear`::

    y = base(x) + ((x @ A_cat^T) * M) @ B_cat^T        x: [N, in], A_cat: [R, in], B_cat: [out, R]

``A_cat`` / ``B_cat`` concatenate the A and B of every resident adapter on that linear (R = the sum
of their ranks) and ``M: [N, R]`` is the per-token column mask: a token's own adapter's columns hold
its scaling, every other column 0 (a base-model token: all 0). So the base matmul stays one call for
the whole batch and the low-rank part is two GEMMs whatever the number of adapters in it (Punica /
S-LoRA compute it with gathered per-token kernels; on a CPU two small GEMMs beat many tiny ones). A
step with no adapter token skips the low-rank part entirely. The masked columns contribute exact
zeros, so each token gets what its adapter alone gives (up to float summation order).

Adapters are added and removed at run time; the training-side multi-adapter API
(:mod:`slimlm.peft.multi`) is not involved: the served model carries no default adapter.

Example::

    lora = MultiLora(lm.model)
    lora.add("sql", "adapters/sql")                 # a folder peft's save_pretrained wrote
    with lora.select(["sql"] * 5 + [None] * 3):     # per token of the flattened step (None: base)
        logits = lm.model(ids)                      # ids: [1, 8]
    lora.remove("sql")                              # the linears are plain again
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from slimlm.models.layers import linear
from slimlm.peft.adapter import module_parts, read_adapter
from slimlm.peft.lora.model import lora_from_peft_config
from slimlm.peft.registry import method_for_peft_type
from slimlm.peft.targets import is_linear, to_runtime_path
from slimlm.utils.errors import CheckpointError, ConfigError, SlimlmError


@dataclass
class _Step:
    """The adapter choice of the running forward: ``onehot [N, K]`` (K = resident adapters, in
    :attr:`MultiLora.order`), or ``None`` when no token of the step runs an adapter."""

    onehot: torch.Tensor | None = None
    masks: dict[tuple[tuple[int, int, float], ...], torch.Tensor] = field(default_factory=dict)

    def mask(self, cols: tuple[tuple[int, int, float], ...]) -> torch.Tensor:
        """``M [N, R]`` for a linear whose columns are ``(adapter index, rank, scaling)`` runs (cached per step)."""
        m = self.masks.get(cols)
        if m is None:
            assert self.onehot is not None
            idx = torch.tensor([k for k, r, _ in cols for _ in range(r)])
            scale = torch.tensor([s for _, r, s in cols for _ in range(r)], dtype=torch.float32)
            m = self.masks[cols] = self.onehot[:, idx] * scale
        return m


class ServedLoraLinear(nn.Module):
    """A base linear (plain or any compressed kind) plus the resident adapters that target it."""

    def __init__(self, base: nn.Module, step: _Step):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features = int(base.in_features), int(base.out_features)  # type: ignore[arg-type]
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}  # name -> (A [r, in], B [out, r], s)
        self._step = step
        self._cat: tuple[torch.Tensor, torch.Tensor, tuple[tuple[int, int, float], ...]] | None = None

    def rebuild(self, order: Sequence[str]) -> None:
        """Concatenate the adapters in the resident ``order`` (after an add / remove)."""
        names = [n for n in order if n in self.adapters]
        if not names:
            self._cat = None
            return
        a = torch.cat([self.adapters[n][0] for n in names], 0)  # [R, in]
        b = torch.cat([self.adapters[n][1] for n in names], 1)  # [out, R]
        cols = tuple((list(order).index(n), self.adapters[n][0].shape[0], self.adapters[n][2]) for n in names)
        self._cat = (a.contiguous(), b.t().contiguous(), cols)  # B stored as B^T [R, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., in] -> [..., out]
        y = linear(self.base_layer, x)
        cat, step = self._cat, self._step
        if cat is None or step.onehot is None:
            return y
        a, bt, cols = cat
        xf = x.reshape(-1, self.in_features).to(a.dtype)  # [N, in]
        if xf.shape[0] != step.onehot.shape[0]:
            raise SlimlmError(f"adapter choice covers {step.onehot.shape[0]} tokens, the batch has {xf.shape[0]}")
        t = (xf @ a.t()) * step.mask(cols)  # [N, R]
        if y.dtype == t.dtype:
            return torch.addmm(y.reshape(-1, self.out_features), t, bt).view(y.shape)  # y + t @ B^T in one call
        return y + (t @ bt).view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


class MultiLora:
    """The resident adapters of one model: ``add`` / ``remove`` between forwards, ``select`` per forward."""

    def __init__(self, model: nn.Module):
        if getattr(model, "config", None) is None or not hasattr(model.config, "family"):
            raise SlimlmError("multi-LoRA serving runs on a slimlm runtime model (lm.model)")
        self.model = model
        self.order: list[str] = []  # resident adapter names; index = column of the step's one-hot
        self.paths: dict[str, list[str]] = {}  # name -> runtime paths it covers
        self._step = _Step()

    @property
    def names(self) -> list[str]:
        return list(self.order)

    def add(self, name: str, folder: str | Path) -> list[str]:
        """Load the LoRA adapter of a peft-layout ``folder`` as ``name``; returns the runtime paths it
        covers. Nothing changes when it does not fit the model (bad files, shapes, targets)."""
        if not isinstance(name, str) or not name or name in self.order:
            raise ConfigError(f"adapter name {name!r} is empty or already loaded")
        meta, tensors = read_adapter(folder)
        method = method_for_peft_type(str(meta.get("peft_type")))
        if method.name != "lora":
            raise ConfigError(f"{folder}: only LoRA adapters can be served, not {method.name}")
        cfg = lora_from_peft_config(meta)
        if cfg.use_dora or cfg.init_lora_weights in ("pissa", "loftq"):
            raise ConfigError(f"{folder}: served adapters are plain LoRA (no DoRA, or PiSSA / LoftQ bases); "
                              "merge such an adapter into its own model instead")
        placed: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
        for hf_path, ts in module_parts(method, tensors).items():
            path = to_runtime_path(self.model.config, hf_path)  # type: ignore[arg-type]
            if ".layers." not in f".{path}":
                raise ConfigError(f"adapter {name!r} targets {hf_path}: only the decoder layers' linears are served "
                                  "(the head runs on the sampled tokens only)")
            try:
                mod = self.model.get_submodule(path)
            except AttributeError:
                raise CheckpointError(f"adapter {name!r} targets {hf_path}, which this model lacks") from None
            base = mod.base_layer if isinstance(mod, ServedLoraLinear) else mod
            a, b = ts.get("lora_A.weight"), ts.get("lora_B.weight")
            if not is_linear(base) or a is None or b is None or set(ts) != {"lora_A.weight", "lora_B.weight"}:
                raise CheckpointError(f"adapter {name!r}: {hf_path} is not a LoRA pair on a linear")
            if a.shape[1] != base.in_features or b.shape != (base.out_features, a.shape[0]):
                raise CheckpointError(f"adapter {name!r} for {hf_path} has A {tuple(a.shape)} / B {tuple(b.shape)}, "
                                      "which do not fit the layer: is it an adapter for another base model?")
            r = a.shape[0]
            placed[path] = (a.float(), b.float(), cfg.lora_alpha / (r**0.5 if cfg.use_rslora else r))
        if not placed:
            raise CheckpointError(f"{folder}: the adapter holds no tensors")
        for path, ab in placed.items():
            mod = self.model.get_submodule(path)
            if not isinstance(mod, ServedLoraLinear):
                mod = ServedLoraLinear(mod, self._step)
                self.model.set_submodule(path, mod)
            mod.adapters[name] = ab
        self.order.append(name)
        self.paths[name] = sorted(placed)
        self._rebuild()
        return self.paths[name]

    def remove(self, name: str) -> None:
        """Drop adapter ``name``; a linear no adapter targets any more gets its plain base back."""
        if name not in self.order:
            raise SlimlmError(f"no adapter named {name!r} is loaded")
        for path in self.paths.pop(name):
            mod = self.model.get_submodule(path)
            assert isinstance(mod, ServedLoraLinear)
            del mod.adapters[name]
            if not mod.adapters:
                self.model.set_submodule(path, mod.base_layer)
        self.order.remove(name)
        self._rebuild()

    def _rebuild(self) -> None:
        for m in self.model.modules():
            if isinstance(m, ServedLoraLinear):
                m.rebuild(self.order)

    @contextmanager
    def select(self, per_token: Sequence[str | None]) -> Iterator[None]:
        """Within the block, token i of the (flattened) forward runs adapter ``per_token[i]`` (None: the base)."""
        index = {n: k for k, n in enumerate(self.order)}
        if any(n is not None and n not in index for n in per_token):
            bad = next(n for n in per_token if n is not None and n not in index)
            raise SlimlmError(f"unknown adapter {bad!r}; loaded: {self.order}")
        rows = [i for i, n in enumerate(per_token) if n is not None]
        if rows:
            onehot = torch.zeros(len(per_token), len(self.order))
            onehot[rows, [index[per_token[i]] for i in rows]] = 1.0  # type: ignore[index]
            self._step.onehot, self._step.masks = onehot, {}
        try:
            yield
        finally:
            self._step.onehot, self._step.masks = None, {}
