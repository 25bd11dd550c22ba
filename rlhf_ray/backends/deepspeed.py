"""DeepSpeed specifics for the learner: process-group set-up, the ZeRO config, the optimiser,
ZeRO-3 model loading and parameter gathering.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
from typing import Iterator, Sequence

import torch

from rlhf_ray.config import Config, LearnerConfig, Sizes


def dist_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(master_addr: str, master_port: int, rank: int, world_size: int, timeout_s: float) -> None:
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


def ds_config(cfg: Config, sizes: Sizes) -> dict:
    """The DeepSpeed config dict for the PPO learner group."""
    return learner_ds_config(cfg.learner, sizes.grad_accum_steps, cfg.model.dtype)


def learner_ds_config(lrn: LearnerConfig, grad_accum_steps: int, dtype: str) -> dict:
    """DeepSpeed config for a learner section with ``grad_accum_steps`` micro-batches per rank
    per optimiser step (PPO learner and supervised trainers alike)."""
    zero: dict = {"stage": lrn.zero_stage}
    if lrn.zero_stage == 3:
        # Gather whole layers on use, release right after: the memory profile ZeRO-3 is for.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=int(5e7))
    if lrn.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": lrn.micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": lrn.micro_batch_size * grad_accum_steps * lrn.num_ranks,
        "gradient_clipping": lrn.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bfloat16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def build_optimizer(model: torch.nn.Module, lrn: LearnerConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable parameters at learner.lr; an actor-critic's value head
    (parameters named ``value_head.*``) gets its own group at value_head_lr."""
    head, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (head if name.startswith("value_head.") else rest).append(p)
    groups = [{"params": rest, "lr": lrn.lr, "name": "policy"},
              {"params": head, "lr": lrn.value_head_lr or lrn.lr, "name": "value_head"}]
    groups = [g for g in groups if g["params"]]
    if lrn.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lrn.lr, weight_decay=lrn.weight_decay)
    return torch.optim.AdamW(groups, lr=lrn.lr, betas=lrn.adam_betas, weight_decay=lrn.weight_decay)


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
    """Warm-up then learner.lr_schedule over ``total_steps`` optimiser steps (DeepSpeed steps it
    once per optimiser step; its state is saved in DeepSpeed checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
        step, lrn.warmup_steps, total_steps, lrn.lr_schedule, lrn.min_lr_ratio))


STATE_TAG = "state"


def save_engine_state(engine, path: str) -> None:
    """All ranks: model, optimiser and scheduler state (this rank's ZeRO shards) under ``path``."""
    engine.save_checkpoint(path, tag=STATE_TAG)


def load_engine_state(engine, path: str, rank: int) -> None:
    """All ranks: restore what ``save_engine_state`` wrote; FileNotFoundError if nothing is there."""
    load_path, _ = engine.load_checkpoint(path, tag=STATE_TAG, load_optimizer_states=True,
                                          load_lr_scheduler_states=True)
    if load_path is None:
        raise FileNotFoundError(f"no DeepSpeed state under {path} (rank {rank})")


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


@contextlib.contextmanager
def gathered(params: Sequence[torch.nn.Parameter], zero_stage: int) -> Iterator[None]:
    """Full values of ``params`` inside the block. Under ZeRO-3 every rank must enter it."""
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params), modifier_rank=None):
            yield
    else:
        yield


def param_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    """Full shape, also for a ZeRO-3 partitioned parameter (whose local tensor is empty)."""
    return tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
