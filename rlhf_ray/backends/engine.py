"""The training-engine contract: what the PPO learner and the SFT/RM trainers need from a
data-parallel training framework, and the framework-free pieces every engine shares (the
optimiser, the learning-rate schedule; the activation-memory estimate, whose home is
``rlhf_ray.backends.memory``, is re-exported here).

Two implementations: ``rlhf_ray.backends.deepspeed`` (ZeRO 0-3, optimiser offload) and
``rlhf_ray.backends.fsdp2`` (PyTorch's ``fully_shard``), picked by ``learner.backend``. A backend
is a module with two functions, :class:`TrainBackend`: ``join_group`` (the ranks' process group)
and ``build`` (an engine around a model). Nothing outside a backend's own file names its
framework; the roles hold a :class:`TrainEngine` and call only what is written here.

Loss normalisation is the caller's, rank means are the engine's: a caller divides each
micro-batch's loss by the unit count of the whole optimiser step over all ranks (tokens,
sequences or pairs), so the sum of every rank's micro-batch losses is the full-batch loss. The
engine makes the gradient exactly the gradient of that sum, whatever averaging its framework
does over ranks or accumulation steps.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Collection, ContextManager, Iterable, Iterator, NamedTuple, Protocol, Sequence

import torch

from rlhf_ray.config import LearnerConfig


class StepOutcome(NamedTuple):
    """What an optimiser step did."""

    applied: bool  # False when the step was skipped (non-finite gradient): weights, optimiser and schedule unchanged
    grad_norm: torch.Tensor | float | None  # pre-clip global gradient norm over all ranks (None if not known)


@dataclass(frozen=True)
class EngineSettings:
    """What ``build`` reads besides the model."""

    learner: LearnerConfig  # optimiser, schedule, clipping, sharding, offload, micro-batch size
    dtype: str  # model.dtype: "float32" or "bfloat16" (compute dtype; optimiser state stays float32)
    grad_accum_steps: int  # nominal micro-batches per optimiser step per rank
    total_steps: int  # optimiser steps over the run: the learning-rate schedule's horizon
    hidden_size: int | None = None  # the model's hidden size where known (sizes ZeRO-3 buckets)


class TrainEngine(Protocol):
    """One data-parallel rank's model, optimiser and schedule. Every method that moves data
    between ranks (``backward`` at the last micro-batch, ``step``, ``gathered``, ``save``,
    ``load``, and the forward under full sharding) must be called by every rank in the same
    order."""

    module: torch.nn.Module
    """The model as built (its parameters may be shards). Read its structure and named parameters
    through it; run it through the engine's ``__call__`` so the framework's hooks run."""

    device: torch.device
    """Where this rank computes (``cuda:<i>`` of the GPU Ray assigned, or cpu)."""

    outside_grad_scale: float
    """``backward`` runs autograd on ``loss x outside_grad_scale``: a tensor outside the engine
    that the loss depends on (the value head replicated beside it, ``rlhf_ray.backends.replicated``)
    receives that multiple of its gradient, and divides it out after summing over ranks.
    DeepSpeed: the world size (it averages its own gradients over ranks, so the loss is scaled);
    FSDP2: 1 (it reduces with a sum)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """The model's forward, with whatever the framework does around it (gathering sharded
        parameters, casting to the compute dtype)."""

    def train(self) -> None:
        """Training mode (dropout on, where the model has any)."""

    def eval(self) -> None:
        """Evaluation mode."""

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Accumulate the gradient of ``loss``, this rank's share of one optimiser step's loss
        (already divided by the step's unit count over all ranks). ``last`` marks the step's
        last micro-batch on this rank (the same count on every rank): there the gradients are
        reduced over ranks. After the last one each parameter's gradient is the SUM over ranks
        and micro-batches, i.e. the full-batch gradient: an engine whose framework averages over
        ranks or divides by the accumulation count undoes it here.

        Tensors outside the engine that ``loss`` depends on receive the gradient of
        ``loss x outside_grad_scale`` on this rank, unreduced."""

    def step(self, hold: Collection[str] = ()) -> StepOutcome:
        """The optimiser-step boundary, after ``backward(..., last=True)``: clip the global
        gradient norm to ``learner.max_grad_norm`` (0: no clipping), skip the step when that norm
        is not finite (gradients dropped; weights, optimiser state and schedule untouched), else
        apply it and advance the learning-rate schedule; gradients are zero afterwards.

        ``hold``: names of parameter groups (:func:`param_groups`) this step leaves exactly as they
        are, weights, Adam moments and step counts (:func:`held_groups`); their gradients, if any,
        are dropped and still count in the clipped norm. The schedule advances all the same."""

    def lr(self) -> float:
        """The learning rate the next step applies (the first parameter group's)."""

    def gathered(self, params: Sequence[torch.nn.Parameter]) -> ContextManager[list[torch.Tensor]]:
        """Inside the block, the full values of ``params`` (on this rank's device, in order, each
        in ``value_dtype(p)``; read them, do not keep or change them). Collective where
        parameters are sharded: every rank enters with the same parameters."""

    def value_dtype(self, p: torch.nn.Parameter) -> torch.dtype:
        """The dtype the model computes with ``p`` in, which ``gathered`` gives and a weight sync
        or an exported checkpoint carries: model.dtype for floating-point weights, whatever
        dtype the engine keeps its master copy in (FSDP2 keeps float32 under bf16 compute)."""

    def full_shape(self, p: torch.nn.Parameter) -> tuple[int, ...]:
        """``p``'s full shape, also for a shard."""

    def local_numel(self, p: torch.nn.Parameter) -> int:
        """Elements of ``p`` held on this rank."""

    def save(self, path: str) -> None:
        """Write this rank's engine state (model, optimiser, schedule; its shards) under the
        directory ``path``; every rank calls it with the same path."""

    def load(self, path: str) -> None:
        """Restore what ``save`` wrote under ``path`` (same world size and sharding);
        FileNotFoundError when nothing is there."""


class TrainBackend(Protocol):
    """A backend module (``rlhf_ray/backends/<name>.py``, named by ``learner.backend``)."""

    def join_group(self, master_addr: str, master_port: int, rank: int, world_size: int,
                   timeout_s: float) -> None:
        """Join the ranks' default process group (every rank concurrently; rank 0's store is
        already served at the address). A collective waiting longer than ``timeout_s`` raises."""

    def build(self, load: Callable[[], torch.nn.Module], settings: EngineSettings) -> TrainEngine:
        """An engine around the model that ``load()`` returns. ``load`` runs inside whatever
        context the framework needs to shard weights as they load. Parameter groups: names
        starting with ``value_head.`` train at ``learner.value_head_lr``, the rest at
        ``learner.lr`` (:func:`param_groups`)."""


def engine_label(lrn: LearnerConfig) -> str:
    """How start-up lines name the learner section's engine: "ZeRO-2" (DeepSpeed) or "FSDP2,
    reshard after forward" / "FSDP2, gathered to backward" (learner.zero_stage 3 / 2)."""
    if lrn.backend == "fsdp2":
        return "FSDP2, " + ("reshard after forward" if lrn.zero_stage == 3 else "gathered to backward")
    return f"ZeRO-{lrn.zero_stage}"


def train_backend(name: str) -> TrainBackend:
    """The backend module named ``name`` (``learner.backend``)."""
    return importlib.import_module(f"rlhf_ray.backends.{name}")  # type: ignore[return-value]


def dist_backend() -> str:
    """The torch.distributed backend for this machine's tensors: nccl with a GPU, else gloo."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def gather_full_state_dict(engine: TrainEngine, named_params: Iterable[tuple[str, torch.nn.Parameter]],
                           keep: bool) -> dict[str, torch.Tensor]:
    """Full CPU copies of ``named_params`` by name where ``keep`` is True, an empty dict elsewhere.
    One parameter is gathered at a time (at most one is held whole on the device); every rank
    calls it with the same parameters in the same order. Usually rank 0 keeps."""
    full: dict[str, torch.Tensor] = {}
    for name, p in named_params:
        with engine.gathered([p]) as (value,):
            if keep:
                full[name] = value.detach().clone().cpu()
    return full


# --------------------------------------------------------------------------- optimiser and schedule


def param_groups(model: torch.nn.Module, lrn: LearnerConfig) -> list[dict]:
    """The trainable parameters of ``model`` in named groups: ``value_head.*`` (a sequence-
    classification head, or an actor-critic head left in the model) at learner.value_head_lr,
    a separate critic's body (``critic_body.*``) and the rest ("policy") at learner.lr. The
    critic body has a group of its own so that a step can train it and hold the policy
    (``TrainEngine.step(hold=...)``: critic warm-up, critic epochs). Empty groups are left out."""
    head, critic, rest = [], [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name.startswith("value_head.") else critic if name.startswith("critic_body.") else rest).append(p)
    groups = [{"params": rest, "lr": lrn.lr, "name": "policy"},
              {"params": critic, "lr": lrn.lr, "name": "critic"},
              {"params": head, "lr": lrn.value_head_lr or lrn.lr, "name": "value_head"}]
    return [g for g in groups if g["params"]]


@contextlib.contextmanager
def held_groups(optimizer: torch.optim.Optimizer, names: Collection[str]) -> Iterator[None]:
    """Inside the block, a step of ``optimizer`` (the torch optimiser :func:`param_groups` were
    given to; a framework may wrap it and step it group by group) leaves the groups called
    ``names`` exactly as they are: each such group's parameter list is empty while the optimiser
    steps, so it updates no weight and no state there (no weight decay, no Adam moment, no step
    count: the bias correction of the group's later steps is as if the held steps never happened).

    Zero gradients would not do: Adam still moves a weight by its momentum, weight decay shrinks
    it, and its step count (which the bias correction reads) advances."""
    if not names:
        yield
        return
    plain_step = optimizer.step

    def step(*args: Any, **kwargs: Any) -> Any:
        groups = [g for g in optimizer.param_groups if g.get("name") in names]
        kept = [g["params"] for g in groups]
        for g in groups:
            g["params"] = []
        try:
            return plain_step(*args, **kwargs)
        finally:
            for g, params in zip(groups, kept):
                g["params"] = params

    own = vars(optimizer).get("step")  # a step set on the instance before, if any
    optimizer.step = step  # an instance attribute, over the class's method
    try:
        yield
    finally:
        if own is None:
            del optimizer.step
        else:
            optimizer.step = own


def make_torch_optimizer(groups: list[dict], lrn: LearnerConfig, fused: bool | None = None) -> torch.optim.Optimizer:
    """AdamW or SGD over parameter ``groups`` with the learner section's settings. AdamW is
    fused on CUDA (one kernel for all tensors: 4 ms vs 11 ms with foreach for 468M parameters
    on an H200); ``fused=False`` for optimiser state that lives on the CPU."""
    if lrn.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lrn.lr, weight_decay=lrn.weight_decay)
    if fused is None:
        fused = torch.cuda.is_available()
    return torch.optim.AdamW(groups, lr=lrn.lr, betas=lrn.adam_betas, weight_decay=lrn.weight_decay,
                             fused=fused or None)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: str, min_ratio: float) -> float:
    """Factor on the learning rate of optimiser step ``step`` (0-based).

    Warm-up: ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps. Then with
    ``progress = (step - warmup_steps) / (total_steps - warmup_steps)`` clipped to [0, 1]:
    constant 1; linear ``1 - (1 - min_ratio) * progress``; cosine
    ``min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2``. E.g. warm-up 1, total 6,
    cosine to 0.1: steps 0..5 get 1.0, 1.0, 0.914, 0.689, 0.411, 0.186, and 0.1 from step 6 on.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}; use constant, cosine or linear")


def lr_scheduler(optimizer: torch.optim.Optimizer, lrn: LearnerConfig,
                 total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """Warm-up then learner.lr_schedule over ``total_steps`` optimiser steps; stepped once per
    applied optimiser step, saved with the engine state."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
        step, lrn.warmup_steps, total_steps, lrn.lr_schedule, lrn.min_lr_ratio))


# --------------------------------------------------------------------------- memory


def hidden_size_of(path: str) -> int | None:
    """The hidden size in a Hugging Face checkpoint's config (None if it cannot be read)."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(path).get_text_config().hidden_size)
    except (OSError, ValueError, AttributeError):
        return None


@contextlib.contextmanager
def nothing_to_gather(params: Sequence[torch.nn.Parameter]):
    """``gathered`` for parameters that are whole on every rank: their own tensors."""
    yield [p.data for p in params]
