"""Data-parallel training on torch.distributed: DDP or FSDP2 (``fully_shard``), launched by ``torchrun``.

The trainer loop (``slimlm.train.loop``) stays one loop; this module is the handful of hooks it
calls. ``Dist`` is a single process (every hook a no-op) unless ``TrainConfig.distributed`` is
``ddp`` or ``fsdp`` and the process was started by ``torchrun`` (``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK`` in the environment). Then:

- the process group is gloo on CPU (nccl when CUDA is there and the model is on it);
- the model is wrapped: DDP (gradients all-reduced, averaged), or FSDP2 (each decoder layer and
  the root sharded with ``fully_shard``: parameters, gradients and optimizer states are 1/world
  per rank, gathered for each layer's forward and backward);
- every rank draws the SAME global micro-batch of ``world x batch_size`` windows (same seeded
  order) and trains on its slice, so a step sees ``world x batch_size x grad_accum`` windows, the
  same as one process with ``batch_size x world``;
- the loss of a step is summed CE / the GLOBAL count of target tokens (all-reduced), times
  ``world`` because DDP / FSDP average gradients over ranks: the gradient is then exactly the
  single-process one, up to float reduction order;
- logged loss and token counts are all-reduced; only rank 0 writes checkpoints, metrics and outputs
  (the others wait at a barrier); checkpoints hold full (unsharded) tensors in the single-process
  format, plus every rank's RNG state, so a distributed run resumes bit for bit (and a
  checkpoint is readable by a run with another world size, data order included).

Run (2 processes on one machine; docs/finetune.md has the multi-node command)::

    torchrun --nproc-per-node 2 -m slimlm.cli.main finetune MODEL --distributed ddp --data builtin:instruct --out out/a
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from slimlm.utils.errors import SlimlmError

MODES = ("none", "ddp", "fsdp")
FSDP_OPTIMIZERS = ("adamw", "lion")  # element-wise states, shaped like the (sharded) parameter
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched() -> bool:
    """Whether torchrun (or an equivalent launcher) started this process."""
    return all(k in os.environ for k in ENV)


def check_combination(mode: str, optimizer: str, fused_update: bool = False) -> None:
    """Refuse what the distributed modes do not support, naming it (a ConfigError: exit 2)."""
    from slimlm.utils.errors import ConfigError

    if mode not in MODES:
        raise ConfigError(f"train: distributed must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "none":
        return
    if optimizer == "lomo" or fused_update:
        raise ConfigError(f"train: --distributed {mode} with --optimizer {optimizer}: its update runs inside backward, "
                          "before gradients are averaged over ranks; use another optimizer")
    if mode == "fsdp" and optimizer not in FSDP_OPTIMIZERS:
        raise ConfigError(f"train: --distributed fsdp with --optimizer {optimizer}: FSDP shards each tensor, and "
                          f"{optimizer}'s state is not element-wise; use {' or '.join(FSDP_OPTIMIZERS)}, "
                          "or --distributed ddp")


class Dist:
    """This process's place in the run (see module docstring); ``Dist()`` is a single process."""

    def __init__(self, mode: str = "none", rank: int = 0, world: int = 1, local_rank: int = 0,
                 owns_group: bool = False) -> None:
        self.mode, self.rank, self.world, self.local_rank = mode, rank, world, local_rank
        self.owns_group = owns_group  # close() ends only a process group this Dist started

    @classmethod
    def from_env(cls, mode: str) -> Dist:
        """The run's Dist: initializes the process group when ``mode`` is ddp/fsdp (needs torchrun),
        unless the caller already did (then the caller also ends it: a group cannot be started
        twice under one torchrun launch)."""
        if mode not in MODES:
            raise SlimlmError(f"--distributed must be one of {', '.join(MODES)}, got {mode!r}")
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if mode == "none":
            if launched() and world > 1:
                raise SlimlmError(f"started by torchrun with WORLD_SIZE={world} but --distributed is none: every rank "
                                  "would train the same thing; pass --distributed ddp or fsdp")
            return cls()
        if not launched():
            raise SlimlmError(f"--distributed {mode} needs a torchrun launch (RANK, WORLD_SIZE, LOCAL_RANK unset): "
                              f"torchrun --nproc-per-node N -m slimlm.cli.main finetune ... --distributed {mode}")
        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))
        return cls(mode, dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]), owns)

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # --- model ---------------------------------------------------------------------------------
    def wrap(self, model: nn.Module) -> nn.Module:
        """The module the loop runs forward/backward through. DDP: a wrapper (``model`` itself keeps
        the parameters and their names); FSDP2: ``model`` itself, sharded in place (each decoder
        layer, then the root), its parameters replaced by DTensor shards."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # frozen parameters are not synchronized; buffers are identical by construction
            return DistributedDataParallel(model, forward_sync_buffers=False)  # type: ignore[call-arg]
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            odd = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if not p.is_floating_point()})
            if odd:
                raise SlimlmError(f"--distributed fsdp shards float parameters; this model holds {', '.join(odd)} ones "
                                  "(a quantized base): use --distributed ddp, or a float base")
            stack = getattr(model, "model", None)
            for layer in getattr(stack, "layers", []):
                fully_shard(layer)
            fully_shard(model)
            return model
        return model

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Skip the gradient reduction on all but the last micro-batch of a step (``last``: reduce)."""
        if self.mode == "ddp" and not last:
            with model.no_sync():  # type: ignore[operator]
                yield
            return
        if self.mode == "fsdp":
            model.set_requires_gradient_sync(last)  # type: ignore[operator]
        yield

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Clip the global gradient norm (over every rank's shards under FSDP); returns it."""
        grads = [p.grad for p in params if p.grad is not None]
        total = torch.nn.utils.get_total_norm(grads)
        from torch.distributed.tensor import DTensor

        if isinstance(total, DTensor):
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return float(total)

    # --- collectives -----------------------------------------------------------------------------
    def sum(self, *values: float) -> list[float]:
        """Element-wise sum over ranks (float64, so token counts stay exact)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()  # type: ignore[no-any-return]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank (a single process: ``[obj]``)."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    # --- FSDP: full tensors for checkpoints and outputs -------------------------------------------
    @contextlib.contextmanager
    def full_params(self, model: nn.Module, writeback: bool = False) -> Iterator[None]:
        """Under FSDP, swap every sharded parameter of ``model`` for a plain full copy (a collective:
        every rank calls it) so code written for one process (saving, ``copy_`` on resume) sees
        ordinary tensors under the usual names; ``writeback``: copy the full tensors' values back
        into the shards on exit. A no-op otherwise."""
        if self.mode != "fsdp":
            yield
            return
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor, distribute_tensor

        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.reshard()  # sharded state: FSDP's state-dict hooks then leave the swap alone
        full: dict[int, tuple[Any, nn.Parameter]] = {}  # id -> (the sharded DTensor parameter, its full copy)
        swapped: list[tuple[nn.Module, str, Any]] = []
        for m in model.modules():
            for name, p in list(m._parameters.items()):
                if isinstance(p, DTensor):
                    if id(p) not in full:  # tied weights stay tied
                        full[id(p)] = (p, nn.Parameter(p.full_tensor().detach().clone(), requires_grad=p.requires_grad))
                    m._parameters[name] = full[id(p)][1]
                    swapped.append((m, name, p))
        try:
            yield
        finally:
            if writeback:
                with torch.no_grad():
                    for sharded, plain in full.values():
                        local = distribute_tensor(plain.detach(), sharded.device_mesh, sharded.placements,
                                                  src_data_rank=None)
                        sharded.to_local().copy_(local.to_local())
            for m, name, p in swapped:
                m._parameters[name] = p

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` with sharded states gathered to full tensors (a collective)."""
        sd = optimizer.state_dict()
        if self.mode != "fsdp":
            return sd
        from torch.distributed.tensor import DTensor

        state = {i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in sorted(s.items())}
                 for i, s in sorted(sd["state"].items())}
        return {**sd, "state": state}

    def shard_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """After ``load_state_dict`` of a full state: each parameter-shaped state becomes this rank's
        shard, laid out like its (sharded) parameter."""
        if self.mode != "fsdp":
            return
        from torch.distributed.tensor import DTensor, distribute_tensor

        for g in optimizer.param_groups:
            for p in g["params"]:
                st = optimizer.state.get(p, {})
                for k, v in list(st.items()):
                    if isinstance(p, DTensor) and torch.is_tensor(v) and not isinstance(v, DTensor) \
                            and tuple(v.shape) == tuple(p.shape):
                        st[k] = distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)

    def close(self) -> None:
        if self.active and self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


__all__ = ["FSDP_OPTIMIZERS", "MODES", "Dist", "check_combination", "launched"]
