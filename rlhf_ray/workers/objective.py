"""The PPO learner's loss on one micro-batch, assembled from ``rlhf_ray.algorithms`` by the
``ppo`` section: the clipped surrogate (token or sequence ratio) with the off-policy correction,
the KL term when the KL is in the loss, the entropy bonus, all aggregated by ``ppo.loss_agg``
over the whole optimiser step's counts; plus the value loss when there is a critic
(``value_objective``, which the value-only passes of a critic warm-up and of critic epochs train
on alone).

A function of tensors and the config section, kept apart from the engine so the learner reads
as set-up, forward, update and sync.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_ray.algorithms import aggregate, clipped_surrogate, kl_loss_tokens, masked_sum, rollout_correction, value_loss
from rlhf_ray.batch import ExperienceBatch
from rlhf_ray.config import PPOConfig


class Objective(NamedTuple):
    loss: torch.Tensor  # 0-dim, differentiable: this micro-batch's share of the step's loss
    stats: dict[str, torch.Tensor]  # detached per-token means over the micro-batch (device tensors)


def ppo_objective(p: PPOConfig, mb: ExperienceBatch, logprobs: torch.Tensor, values: torch.Tensor | None,
                  entropy: torch.Tensor, *, step_tokens: float, step_sequences: float, kl_coef: float,
                  max_len: int) -> Objective:
    """The loss of micro-batch ``mb`` (old logprobs/values, advantages, returns, masks, engine
    logprobs, reference logprobs with the KL in the loss). ``logprobs``, ``entropy`` (B, R) from
    the current policy; ``values`` (B, R) or None without a critic. ``step_tokens`` and
    ``step_sequences`` count the valid tokens and sequences of the whole optimiser step over all
    ranks, so any split of the step sums to the same loss; ``max_len`` is Dr. GRPO's constant."""
    mask = mb.response_mask
    corr = rollout_correction(mb.old_logprobs, mb.rollout_logprobs, mask, p.rollout_correction,
                              cap=p.correction_cap, low=p.correction_low, high=p.correction_high)
    sur = clipped_surrogate(logprobs, mb.old_logprobs, mb.advantages, corr.mask, p.clip_ratio,
                            clip_ratio_high=p.clip_ratio_high, dual_clip=p.dual_clip, ratio=p.ratio)
    # The correction weighs only the policy-gradient term (icepop: 0 at the tokens it drops); the
    # KL and entropy terms keep every valid token. Aggregated over the response mask, so a dropped
    # token still counts in its sequence's length, as in IcePop's objective (arXiv:2510.18855).
    per_token = sur.per_token * corr.weights
    kl = kl_loss_tokens(logprobs, mb.ref_logprobs, p.kl_estimator, mask=mask) if p.kl_in == "loss" else None
    if kl is not None:
        per_token = per_token + kl_coef * kl

    def agg(x: torch.Tensor) -> torch.Tensor:
        return aggregate(x, mask, p.loss_agg, step_tokens=step_tokens, step_sequences=step_sequences, max_len=max_len)

    loss = agg(per_token) - p.entropy_coef * agg(entropy)
    if values is not None:
        value = value_objective(p, mb, values, step_tokens=step_tokens)
        loss = loss + value.loss
    with torch.no_grad():
        def mean(x: torch.Tensor) -> torch.Tensor:
            return masked_sum(x.float(), mask) / mask.sum().clamp(min=1)

        log_ratio = sur.log_ratio
        stats = {
            "policy_loss": mean(sur.per_token.detach()),
            "clip_fraction": mean(sur.clipped),
            "policy_kl": mean(log_ratio.exp() - 1 - log_ratio),  # k3 of KL(old || new)
            "entropy": mean(entropy.detach()),
            "ratio_dev_max": ((logprobs - mb.old_logprobs).exp() - 1).abs().masked_fill(~mask, 0).max(),
        }
        if values is not None:
            stats.update(value.stats)
        if kl is not None:
            stats["kl_loss"] = mean(kl.detach())
        if p.rollout_correction != "none":
            stats.update({"correction/weight_mean": corr.weight_mean, "correction/weight_max": corr.weight_max,
                          "correction/fraction": corr.corrected_fraction})
    return Objective(loss, stats)


def value_objective(p: PPOConfig, mb: ExperienceBatch, values: torch.Tensor, *, step_tokens: float) -> Objective:
    """The value part of the loss alone: ppo.vf_coef x the clipped value loss of ``values`` (B, R)
    against ``mb``'s returns, summed over this micro-batch's tokens and divided by ``step_tokens``
    (the whole step's count over all ranks). ``ppo_objective`` adds it to the policy loss; the
    value-only passes (critic warm-up, critic epochs) train on it alone, so the value part of their
    gradient is exactly that of a PPO step on the same batch."""
    mask = mb.response_mask
    vl = value_loss(values, mb.old_values, mb.returns, mask, clip_range=p.value_clip, num_tokens=step_tokens)
    with torch.no_grad():
        stats = {"value_loss": vl.loss.detach() * step_tokens / mask.sum().clamp(min=1),
                 "value_clip_fraction": vl.clip_fraction}
    return Objective(p.vf_coef * vl.loss, stats)
