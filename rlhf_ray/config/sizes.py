"""Batch sizes derived once from a PPO config, by exact division that names the flags to change.

The divisions follow the split the system performs, and only that split:

1. ``LearnerGroup`` slices the iteration's samples (``rollout.prompts_per_iteration x
   rollout.samples_per_prompt``) into one equal shard per learner rank (``ExperienceBatch.split``);
2. each rank splits its shuffled shard into ``ppo.mini_batches`` equal mini-batches, one
   optimiser step each (``Learner.train``);
3. each rank's mini-batch is cut into micro-batches of ``learner.micro_batch_size`` sequences,
   unless ``learner.micro_batch_tokens`` sizes them by tokens at run time.

Prompts need not divide over the rollout engines: ``RolloutGroup.generate`` hands each engine a
contiguous run of ceil(prompts / engines) and the last one the rest.

Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhf_ray.config.schema import Config, ConfigError


@dataclass(frozen=True)
class Sizes:
    """The derived sizes the learner ranks read (counts are sequences)."""

    grad_accum_steps: int  # micro-batches per rank per optimiser step (nominal 1 with a token budget)
    optimizer_steps_per_iteration: int  # ppo.epochs x ppo.mini_batches


def _divide(num: int, den: int, what: str, flags: str) -> tuple[int, str | None]:
    """``(num // den, None)`` when exact, else the quotient and a message naming ``flags``."""
    if den <= 0:
        return 0, f"{what}: divisor must be positive; change {flags}."
    if num % den:
        return num // den, f"{what}: {num} is not divisible by {den}; change {flags}."
    return num // den, None


def resolve(cfg: Config) -> Sizes:
    """Derive the sizes, raising ConfigError naming the flags when a division is not exact.

    Each division builds on the one before, so only the first broken one is reported."""
    r, p, lrn = cfg.rollout, cfg.ppo, cfg.learner
    samples = r.prompts_per_iteration * r.samples_per_prompt
    per_rank, error = _divide(samples, lrn.num_ranks, "samples per iteration / learner ranks",
                              "--rollout.prompts_per_iteration, --rollout.samples_per_prompt or --learner.num_ranks")
    mini_per_rank = 0
    if error is None:
        mini_per_rank, error = _divide(
            per_rank, p.mini_batches, "samples per learner rank / mini-batches",
            "--rollout.prompts_per_iteration, --rollout.samples_per_prompt, --learner.num_ranks or --ppo.mini_batches")
    accum = 1  # with a token budget micro-batches are sized at run time; DeepSpeed's count is nominal
    if error is None and lrn.micro_batch_tokens <= 0:
        accum, error = _divide(mini_per_rank, lrn.micro_batch_size, "per-rank mini-batch / micro-batch",
                               "--learner.micro_batch_size or --ppo.mini_batches")
    if error is not None:
        raise ConfigError("batch sizes do not divide:\n  - " + error)
    return Sizes(grad_accum_steps=accum, optimizer_steps_per_iteration=p.epochs * p.mini_batches)
