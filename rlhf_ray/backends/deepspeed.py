"""DeepSpeed behind the training-engine contract (``rlhf_ray.backends.engine.TrainEngine``):
ZeRO stages 0-3, optimiser-state offload, bf16 with float32 master weights.

The only module that imports DeepSpeed. What it adapts to the contract:
- DeepSpeed averages gradients over ranks and (with ``scale_wrt_gas``) over accumulation steps;
  ``backward`` scales the loss by the world size and turns the accumulation scaling off, so the
  gradient is the sum the contract promises.
- DeepSpeed's step must be called after every micro-batch (it counts them) and applies the
  optimiser only at the accumulation boundary, which ``backward(..., last)`` sets.
- ZeRO-0 in float32 clips without keeping the norm and applies a non-finite step (ZeRO-1/2/3
  and bf16 skip it): the norm is taken from the reduced gradients and such a step is skipped
  here, as DeepSpeed does elsewhere.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from typing import Any, Callable, Collection, Iterator, Sequence

import torch

from rlhf_ray.backends.engine import (EngineSettings, StepOutcome, dist_backend, held_groups, lr_scheduler,
                                      make_torch_optimizer, nothing_to_gather, param_groups)
from rlhf_ray.config import LearnerConfig


def join_group(master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float) -> None:
    """Join the learner group. Every rank must call this concurrently. A collective that waits
    longer than ``timeout_s`` (a peer died mid-operation) raises instead of blocking the rank."""
    import deepspeed

    os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    if not torch.cuda.is_available():
        # DeepSpeed's CPU accelerator JIT-compiles a shared-memory allreduce (~70 s on a 2-core
        # machine) and keys its segments by local rank, which every Ray actor reports as 0.
        # gloo alone is correct and fast enough for CPU learners, so the op is skipped.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=dist_backend(), auto_mpi_discovery=False,
                               timeout=datetime.timedelta(seconds=timeout_s))


def learner_ds_config(lrn: LearnerConfig, grad_accum_steps: int, dtype: str, hidden_size: int | None = None) -> dict:
    """DeepSpeed config for a learner section with ``grad_accum_steps`` micro-batches per rank
    per optimiser step (PPO learner and supervised trainers alike).

    ZeRO-3 buckets are sized to the model (``hidden_size`` H) with the rules of DeepSpeed's and
    transformers' documentation: parameters under 10 H elements (norms, biases) stay whole on
    every rank instead of being gathered at every use, prefetch 0.9 H^2 elements ahead (about
    one projection matrix), reduce in buckets of H^2. On CUDA, gradient reduction overlaps the
    backward pass (ZeRO-2/3)."""
    zero: dict = {"stage": lrn.zero_stage}
    on_gpu = torch.cuda.is_available()
    if lrn.zero_stage == 3:
        h2 = (hidden_size or 1024) ** 2
        zero.update(stage3_param_persistence_threshold=10 * (hidden_size or 1024),
                    stage3_prefetch_bucket_size=int(0.9 * h2), reduce_bucket_size=h2)
    if lrn.zero_stage >= 2 and on_gpu:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if lrn.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "train_micro_batch_size_per_gpu": lrn.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": lrn.micro_batch_size * grad_accum_steps * lrn.num_ranks,
        "gradient_clipping": lrn.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        # With offload, a torch optimiser is the fallback where DeepSpeed's CPU Adam does not build.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def _cpu_adam(groups: list[dict], lrn: LearnerConfig) -> torch.optim.Optimizer | None:
    """DeepSpeed's vectorised CPU Adam for offloaded optimiser state, or None (with a warning)
    where its C++ op cannot be built here."""
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lrn.lr, betas=lrn.adam_betas, weight_decay=lrn.weight_decay,
                                adamw_mode=True)
    except Exception as exc:  # the JIT build needs a compiler and headers
        warnings.warn(f"DeepSpeed's CPU Adam could not be built ({type(exc).__name__}: {exc}); the offloaded optimiser "
                      "state is updated by torch.optim.AdamW instead (slower, same result).")
        return None


def build_optimizer(model: torch.nn.Module, lrn: LearnerConfig) -> torch.optim.Optimizer:
    """The engine's optimiser over ``model``'s trainable parameters (:func:`param_groups`); with
    learner.offload_optimizer, AdamW is DeepSpeed's CPU Adam where it builds."""
    groups = param_groups(model, lrn)
    if lrn.offload_optimizer and lrn.optimizer == "adamw":
        return _cpu_adam(groups, lrn) or make_torch_optimizer(groups, lrn, fused=False)
    return make_torch_optimizer(groups, lrn, fused=False if lrn.offload_optimizer else None)


@contextlib.contextmanager
def zero3_loading(ds_conf: dict) -> Iterator[None]:
    """While active, ``from_pretrained`` shards weights over ranks as it loads (ZeRO-3).

    transformers consults a live ``HfDeepSpeedConfig``; wrapping ``from_pretrained`` in
    ``deepspeed.zero.Init`` fails on transformers 5. Afterwards the global is cleared on every
    rank, since while it lives every ``from_pretrained`` runs collectives."""
    if ds_conf["zero_optimization"]["stage"] != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_conf)
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


STATE_TAG = "state"


class DeepSpeedEngine:
    """A DeepSpeed engine behind :class:`rlhf_ray.backends.engine.TrainEngine`."""

    def __init__(self, engine: Any, optimizer: torch.optim.Optimizer, world_size: int, zero_stage: int,
                 base_optimizer: torch.optim.Optimizer | None = None) -> None:
        self._engine = engine
        self.optimizer = optimizer  # DeepSpeed's (a ZeRO or bf16 wrapper, or the base itself)
        self.base_optimizer = base_optimizer or optimizer  # the torch optimiser it steps (held_groups)
        self.module = engine.module
        self.device = engine.device  # cuda:0 of the GPU Ray assigned, or cpu
        self.world_size = world_size
        self.zero_stage = zero_stage
        self.outside_grad_scale = float(world_size)  # the loss is scaled by it in backward

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward through DeepSpeed (ZeRO-3 gathers in its hooks); a method of its
        own so a profiler can wrap it on the instance (``benchmarks/learner_gpu.py``)."""
        return self._engine(*args, **kwargs)

    def train(self) -> None:
        self._engine.train()

    def eval(self) -> None:
        self._engine.eval()

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self._engine.set_gradient_accumulation_boundary(last)
        # Undo DeepSpeed's mean over ranks and its 1/accumulation scaling: the caller's step counts normalise.
        self._engine.backward(loss * self.world_size, scale_wrt_gas=False)
        if not last:
            self._engine.step()  # counts the micro-batch; applies nothing off the boundary

    def step(self, hold: Collection[str] = ()) -> StepOutcome:
        # Every ZeRO stage and the bf16 wrapper end in the base optimiser's step (stage 1/2 and 3
        # once per group or sub-group): held there, a group keeps its weights and state.
        with held_groups(self.base_optimizer, hold):
            return self._step()

    def _step(self) -> StepOutcome:
        norm = self._engine.get_global_grad_norm()
        skip = False
        if norm is None:  # ZeRO-0 in float32: DeepSpeed neither keeps the norm nor skips
            grads = [q.grad for q in self.module.parameters() if q.grad is not None]
            if grads:
                norm = torch.nn.utils.get_total_norm(grads)
                skip = not bool(torch.isfinite(norm))  # one host sync, ZeRO-0 float32 only
        if skip:
            self._engine.zero_grad()
            return StepOutcome(False, norm)
        self._engine.step()
        after = self._engine.get_global_grad_norm()
        return StepOutcome(bool(self._engine.was_step_applied()), norm if after is None else after)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @contextlib.contextmanager
    def gathered(self, params: Sequence[torch.nn.Parameter]) -> Iterator[list[torch.Tensor]]:
        if self.zero_stage != 3:
            with nothing_to_gather(params) as values:
                yield values
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield [p.data for p in params]

    def value_dtype(self, p: torch.nn.Parameter) -> torch.dtype:
        return p.dtype  # bf16 mode keeps bf16 parameters (the float32 master copy is the optimiser's)

    def full_shape(self, p: torch.nn.Parameter) -> tuple[int, ...]:
        return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)

    def local_numel(self, p: torch.nn.Parameter) -> int:
        return int(p.numel())  # a ZeRO-3 parameter's local tensor is its (possibly empty) partition

    def save(self, path: str) -> None:
        self._engine.save_checkpoint(path, tag=STATE_TAG)

    def load(self, path: str) -> None:
        if not os.path.isdir(os.path.join(path, STATE_TAG)):  # DeepSpeed itself fails with an assertion
            raise FileNotFoundError(f"no DeepSpeed engine state under {path}: {os.path.join(path, STATE_TAG)} does not "
                                    "exist; was it saved with learner.backend deepspeed?")
        load_path, _ = self._engine.load_checkpoint(path, tag=STATE_TAG, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed state under {path}")


def build(load: Callable[[], torch.nn.Module], settings: EngineSettings) -> DeepSpeedEngine:
    """A DeepSpeed engine around ``load()``'s model (sharded as it loads under ZeRO-3), with the
    learner section's optimiser and schedule."""
    import deepspeed
    import torch.distributed as dist

    lrn = settings.learner
    conf = learner_ds_config(lrn, settings.grad_accum_steps, settings.dtype, settings.hidden_size)
    with zero3_loading(conf):
        model = load()
    base = build_optimizer(model, lrn)
    scheduler = lr_scheduler(base, lrn, settings.total_steps)
    # ZeRO-0 in bf16 (DeepSpeed's unfused low-precision wrapper) creates the optimiser state with
    # one zero-gradient step of the base optimiser, which with weight decay would shrink the float32
    # master weights once behind the model's back (written into the model at the first real step,
    # even into a group that step holds). Weight decay is off for that set-up step only.
    decay = [g["weight_decay"] for g in base.param_groups]
    for g in base.param_groups:
        g["weight_decay"] = 0.0
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=base, lr_scheduler=scheduler, config=conf)
    for g, wd in zip(base.param_groups, decay):
        g["weight_decay"] = wd
    return DeepSpeedEngine(engine, optimizer, dist.get_world_size(), lrn.zero_stage, base)
