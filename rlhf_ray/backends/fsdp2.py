"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) behind the training-engine contract
(``rlhf_ray.backends.engine.TrainEngine``): parameters, gradients and optimiser state sharded
over the ranks, bf16 compute with float32 master weights, checkpoints through
torch.distributed.checkpoint (DCP).

The only module that imports FSDP2. How it meets the contract:
- Sharding units: every transformer block (the classes a Hugging Face model lists in
  ``_no_split_modules``, else the entries of a ``layers`` ModuleList), then the root module
  for what is left (embeddings, final norm, output layer). learner.zero_stage 3 frees a block's
  gathered parameters after its forward and gathers them again for the backward; 2 keeps them
  from the forward to the backward.
- Sums, not means: FSDP2 divides the reduce-scattered gradient by the world size. Every sharded
  module is told to divide by 1 and to reduce with a plain SUM
  (``set_gradient_divide_factor(1.0)``, ``set_force_sum_reduction_for_comms(True)``), so the
  gradient is the sum over ranks by construction: exact for any world size, no loss rescaling
  and no extra multiply on the gradients (a loss scaled by a world size that is not a power of
  two would round differently from the unscaled one).
- Accumulation: off the last micro-batch the gradients stay local and unreduced
  (``set_requires_gradient_sync(False)``, accumulated in float32); the last micro-batch's
  backward reduce-scatters their sum.
- dtype "bfloat16": the model is cast to float32 before sharding, so the sharded master weights,
  their gradients and the optimiser state are float32; FSDP2's mixed-precision policy gathers
  the parameters as bf16 for the forward and backward (bf16 compute and activations, bf16
  logits) and reduces the gradients in float32: DeepSpeed's bf16 mode, in FSDP2's terms.
  ``module.parameters()`` are therefore float32 (shards); ``gathered`` casts the full tensors
  to bf16 as the forward does (``value_dtype``), so a sync or an exported checkpoint carries
  bf16, as with DeepSpeed.
- learner.offload_optimizer: FSDP2's CPU offload policy (sharded parameters, gradients and
  optimiser state in CPU memory, the step on the CPU). On a CPU-only machine everything is in
  CPU memory already, so it changes nothing and is not applied.
- Frozen parameters (LoRA's base weights) are sharded like the rest and get no gradient; the
  optimiser holds only trainable ones (built after sharding, over the sharded parameters).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from rlhf_ray.backends.engine import (EngineSettings, StepOutcome, dist_backend, held_groups, lr_scheduler,
                                      make_torch_optimizer, param_groups)

STATE_DIR = "fsdp2"  # under the path save() is given: DCP's shard files and .metadata
SCHEDULE_FILE = "lr_schedule.pt"  # beside them: the learning-rate schedule's state (rank-independent)


def join_group(master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float) -> None:
    """Join the learner group through torch's env:// rendezvous (rank 0's store is already served
    at the address; its ``init_process_group`` reuses it). Every rank must call this
    concurrently. A collective that waits longer than ``timeout_s`` raises instead of blocking.
    A process that already has a default group keeps it (in-process tests build several
    engines in one process)."""
    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(0)  # Ray shows each learner the one GPU it assigned
    dist.init_process_group(dist_backend(), timeout=datetime.timedelta(seconds=timeout_s))


def sharding_units(model: nn.Module) -> list[nn.Module]:
    """The modules sharded one by one before the root, innermost first (``fully_shard`` must run
    bottom-up): instances of the classes that the Hugging Face models inside ``model`` name in
    ``_no_split_modules`` (their transformer blocks), else the entries of every ModuleList
    called ``layers``. May be empty (then the root alone is one unit)."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    units = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not units:
        units = [layer for name, m in model.named_modules() if name.rsplit(".", 1)[-1] == "layers"
                 and isinstance(m, nn.ModuleList) for layer in m]
    return units[::-1]


class FSDP2Engine:
    """An FSDP2-sharded model, its optimiser and schedule behind
    :class:`rlhf_ray.backends.engine.TrainEngine`."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, device: torch.device, max_grad_norm: float,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.max_grad_norm = max_grad_norm
        self.outside_grad_scale = 1.0  # backward runs on the loss itself: FSDP2 reduces with a sum
        self.compute_dtype = compute_dtype  # the mixed-precision policy's parameter dtype
        self._sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
        self._trainable = [p for p in module.parameters() if p.requires_grad]
        self.rank = dist.get_rank()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with warnings.catch_warnings():
            # The actor-critic returns its logits and hidden states at the response positions as
            # views (a slice); FSDP2 warns that an in-place op on a view would skip its hooks.
            # Nothing changes these outputs in place (the loss math is out of place).
            warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
            out = self.module(*args, **kwargs)
        if not torch.is_grad_enabled():
            # No backward will reshard: without this, under zero_stage 2 the gathered parameters
            # would stay registered on the module after a no-grad pass (memory, and stale values
            # if the sharded weights then changed underneath, e.g. by load()).
            self._reshard()
        return out

    def train(self) -> None:
        self.module.train()

    def eval(self) -> None:
        self.module.eval()

    def _reshard(self) -> None:
        for m in self._sharded:
            m.reshard()  # a no-op where the module is sharded already

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.module.set_requires_gradient_sync(last)  # recursive: every sharded module
        loss.backward()

    def step(self, hold: Collection[str] = ()) -> StepOutcome:
        self._reshard()
        grads = [p.grad for p in self._trainable if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
        if isinstance(norm, DTensor):  # per-shard norms: combining them is a collective
            norm = norm.full_tensor()
        if not bool(torch.isfinite(norm)):  # one host sync per step, as DeepSpeed's skip check
            self.optimizer.zero_grad(set_to_none=True)
            return StepOutcome(False, norm)
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self._trainable, self.max_grad_norm, norm)
        with held_groups(self.optimizer, hold):
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutcome(True, norm)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def gathered(self, params: Sequence[nn.Parameter]) -> Iterator[list[torch.Tensor]]:
        with torch.no_grad():
            yield [(p.full_tensor() if isinstance(p, DTensor) else p.data).to(self.value_dtype(p)) for p in params]

    def value_dtype(self, p: nn.Parameter) -> torch.dtype:
        # The float32 master weights are cast as the forward casts them: a sync or an export of a
        # bf16 run carries bf16, as DeepSpeed's does.
        return self.compute_dtype if p.dtype.is_floating_point else p.dtype

    def full_shape(self, p: nn.Parameter) -> tuple[int, ...]:
        return tuple(p.shape)  # a DTensor's shape is the global one

    def local_numel(self, p: nn.Parameter) -> int:
        return int(p.to_local().numel() if isinstance(p, DTensor) else p.numel())

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        return {"model": model_state, "optimizer": optim_state}

    def save(self, path: str) -> None:
        """DCP under ``path/fsdp2``: each rank writes its shards of the model and optimiser state,
        rank 0 the metadata and the schedule's state (``lr_schedule.pt``)."""
        import torch.distributed.checkpoint as dcp

        where = Path(path) / STATE_DIR
        dcp.save(self._state(), checkpoint_id=str(where))
        if self.rank == 0:
            torch.save(self.scheduler.state_dict(), where / SCHEDULE_FILE)
        dist.barrier()  # the schedule's file exists for every rank once save returns

    def load(self, path: str) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        where = Path(path) / STATE_DIR
        if not (where / ".metadata").is_file() or not (where / SCHEDULE_FILE).is_file():
            raise FileNotFoundError(f"no FSDP2 engine state under {path}: {where} has no DCP checkpoint "
                                    f"(.metadata) and {SCHEDULE_FILE} written by save(); was it saved with "
                                    "learner.backend fsdp2?")
        self._reshard()
        state = self._state()
        dcp.load(state, checkpoint_id=str(where))
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"])
        self.scheduler.load_state_dict(torch.load(where / SCHEDULE_FILE, map_location="cpu", weights_only=True))


def build(load: Callable[[], nn.Module], settings: EngineSettings) -> FSDP2Engine:
    """Shard ``load()``'s model over the default group's ranks (each transformer block, then the
    root) and build the learner section's optimiser and schedule over the shards.

    ``load()`` returns the whole model on every rank, in any dtype: it is cast to float32 (the
    master weights) before sharding; settings.dtype "bfloat16" computes in bf16 with float32
    gradient reductions."""
    from torch.distributed.device_mesh import init_device_mesh

    lrn = settings.learner
    on_gpu = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    model = load().to(torch.float32)
    mixed = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
             if settings.dtype == "bfloat16" else MixedPrecisionPolicy())
    # On a CPU-only machine the shards live in CPU memory anyway: offloading changes nothing.
    offload = CPUOffloadPolicy(pin_memory=True) if lrn.offload_optimizer and on_gpu else OffloadPolicy()
    options = dict(mesh=mesh, mp_policy=mixed, offload_policy=offload)
    for unit in sharding_units(model):
        fully_shard(unit, reshard_after_forward=lrn.zero_stage == 3, **options)
    fully_shard(model, **options)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)
    optimizer = make_torch_optimizer(param_groups(model, lrn), lrn,
                                     fused=False if lrn.offload_optimizer or not on_gpu else None)
    compute = torch.bfloat16 if settings.dtype == "bfloat16" else torch.float32
    return FSDP2Engine(model, optimizer, lr_scheduler(optimizer, lrn, settings.total_steps), device, lrn.max_grad_norm,
                       compute)
