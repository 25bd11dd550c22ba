"""The advantages phase: the configured estimator over one iteration's scored batch.

``estimate_advantages`` is a function of tensors and the PPO section (no roles, no state):
the coordinator calls it after quarantining bad samples and preparing the scores, and keeps
the KL controller itself. Estimators (``ppo.estimator``):

* ``gae``: per-token rewards (the score at the last token, the k1 KL penalty on every token
  when ``ppo.kl_in`` is reward), GAE on the learned values, whitening (``ppo.whiten_advantages``).
* ``grpo`` / ``rloo``: the sequence's outcome (score, minus ``kl_coef`` x its summed KL when the
  KL is in the reward) against its prompt group: group-normalised, or leave-one-out.
* ``reinforce_pp`` / ``reinforce_pp_baseline``: REINFORCE++ returns of the per-token rewards,
  whitened over the batch; the baseline variant subtracts the group mean from the score first.

Critic-free estimators return zero returns and no value metrics.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_ray.algorithms import (compute_gae, explained_variance, grpo_advantages, group_baseline_scores,
                                 masked_mean, masked_whiten, reinforce_pp_advantages, rloo_advantages,
                                 shape_token_rewards)
from rlhf_ray.config import PPOConfig

class Advantages(NamedTuple):
    advantages: torch.Tensor  # (B, R) float32, 0 outside ``good``
    returns: torch.Tensor  # (B, R) float32 value targets (zeros for critic-free estimators)
    metrics: dict[str, float]


def estimate_advantages(p: PPOConfig, scores: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                        values: torch.Tensor | None, groups: torch.Tensor, mask: torch.Tensor,
                        valid: torch.Tensor) -> Advantages:
    """Advantages of one batch.

    Args:
        p: the PPO section (estimator, gamma, lam, kl_in, whitening, group_std_norm).
        scores: (B,) prepared outcome rewards (penalties, clipping, normalisation applied).
        kl: (B, R) per-token KL estimate of the old policy to the reference (0 at padding).
        kl_coef: the KL controller's current coefficient.
        values: (B, R) old values (gae only).
        groups: (B,) long, the prompt each sample answers.
        mask: (B, R) bool response mask (every row has a token; quarantined rows' inputs are zeroed).
        valid: (B,) bool, the usable (not quarantined) samples: only they enter any statistic, and the
            others get advantage 0.
    """
    good = mask & valid[:, None]
    reward_kl = kl_coef if p.kl_in == "reward" else 0.0
    if p.estimator == "gae":
        rewards = shape_token_rewards(scores, kl, mask, reward_kl)
        gae = compute_gae(rewards, values, mask, p.gamma, p.lam)
        advantages = masked_whiten(gae.advantages, good) if p.whiten_advantages else gae.advantages * good
        metrics = {"shaped_reward_mean": float(rewards.sum(-1)[valid].mean()),
                   "advantage_mean_raw": float(masked_mean(gae.advantages, good)),
                   "return_mean": float(masked_mean(gae.returns, good)),
                   "value_mean": float(masked_mean(values, good)),
                   "explained_variance": float(explained_variance(values, gae.returns, good))}
        return Advantages(advantages, gae.returns * good, metrics)
    if p.estimator in ("grpo", "rloo"):
        outcome = scores - reward_kl * (kl * good).sum(-1)
        if p.estimator == "grpo":
            advantages = grpo_advantages(outcome, groups, good, std_norm=p.group_std_norm, valid=valid)
        else:
            advantages = rloo_advantages(outcome, groups, good, valid=valid)
        shaped = outcome
    else:
        base = group_baseline_scores(scores, groups, valid=valid) if p.estimator == "reinforce_pp_baseline" else scores
        rewards = shape_token_rewards(base, kl, mask, reward_kl)
        advantages, _ = reinforce_pp_advantages(rewards, good, gamma=p.gamma, valid=valid)
        shaped = rewards.sum(-1)
    metrics = {"shaped_reward_mean": float(shaped[valid].mean()),
               "advantage_abs_mean": float(masked_mean(advantages.abs(), good))}
    return Advantages(advantages * good, torch.zeros_like(advantages), metrics)
