"""A small float32 module trained beside a training engine, replicated on every data-parallel rank.

Used for the actor-critic's value head (``ActorCritic.detach_value_head``). ZeRO-3 flattens
all partitioned parameters into buffers of one dtype, so a float32 head cannot live inside a
bf16 engine there, and a head cast to bf16 would store its bias (the mean return, order 1-10)
with 8 mantissa bits, i.e. steps of ~0.03 at 6. Outside the engine the head keeps float32
weights, float32 optimiser state and a float32 forward on every ZeRO stage, with or without
optimiser offload; it holds H + 1 numbers, so replicating it costs nothing.

Its gradient comes from the same backward as the body's. At each optimiser step the ranks'
gradients are summed with one all-reduce and divided by the engine's ``outside_grad_scale``
(the factor its ``backward`` put on the loss: the world size for DeepSpeed, 1 for FSDP2), so
they are the full-batch gradient as the body's are; clipped to ``max_grad_norm`` on their own
(the body's norm is the engine's), and the step is
skipped when they are not finite or the engine skipped its own step, so body and head never
drift apart by one update.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from rlhf_ray.config import LearnerConfig


class ReplicatedModule:
    """``module`` (float32) with its own optimiser and learning-rate schedule.

    Args:
        module: the module, moved to ``device`` (its parameters stay float32).
        optimizer: over ``module``'s parameters.
        scheduler: stepped once per applied optimiser step (an engine does not step its own
            schedule on a skipped step either, so body and head stay in lock-step).
        max_grad_norm: clip threshold of this module's gradient norm (0: no clipping).
        world_size: data-parallel ranks that hold a replica (1: no communication).
        grad_scale: the factor on every rank's gradient (``TrainEngine.outside_grad_scale``),
            divided out after the sum over ranks.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler, max_grad_norm: float, world_size: int,
                 grad_scale: float = 1.0) -> None:
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.world_size = world_size
        self.grad_scale = grad_scale
        self.params = [p for p in module.parameters() if p.requires_grad]

    def step(self, engine_stepped: bool = True) -> torch.Tensor:
        """Average the gradients over ranks, clip, step unless skipped; returns the pre-clip
        gradient norm (a 0-dim float32 tensor on the module's device, no host sync)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        if self.world_size > 1:
            dist.all_reduce(flat)
        if self.grad_scale != 1.0:
            flat /= self.grad_scale
        norm = flat.norm()
        if self.max_grad_norm > 0:
            flat *= torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        offset = 0
        for p in self.params:
            p.grad = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        # One host sync per optimiser step: whether to apply it.
        if engine_stepped and bool(torch.isfinite(norm)):
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def replicate(module: nn.Module, lrn: LearnerConfig, total_steps: int, device: torch.device,
              world_size: int, grad_scale: float = 1.0) -> ReplicatedModule:
    """The value head's replica, with rank 0's weights on every rank (one broadcast per tensor
    when ``world_size`` > 1; every rank must call it): learner.value_head_lr (default
    learner.lr), the learner's optimiser kind, betas, weight decay, warm-up and schedule, fused
    AdamW on CUDA."""
    from rlhf_ray.backends.engine import lr_scheduler, make_torch_optimizer

    module = module.to(device)
    if world_size > 1:
        # Every rank starts from rank 0's weights: replicas that began apart (a head initialised
        # with another random state, e.g. a different seed or consumption order on one rank) would
        # never agree again, since each applies the same averaged update to its own weights.
        with torch.no_grad():
            for t in [*module.parameters(), *module.buffers()]:
                dist.broadcast(t.data, src=0)
    lr = lrn.value_head_lr or lrn.lr
    optimizer = make_torch_optimizer([{"params": list(module.parameters()), "lr": lr, "name": "value_head"}], lrn)
    return ReplicatedModule(module, optimizer, lr_scheduler(optimizer, lrn, total_steps), lrn.max_grad_norm,
                            world_size, grad_scale)
