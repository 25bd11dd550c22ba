"""The advantages phase: the configured estimator over one iteration's scored batch.

``estimate_advantages`` is a function of tensors and the PPO section (no roles, no state):
the coordinator calls it after quarantining bad samples and preparing the scores, and keeps
the KL controller itself. The estimators (``ppo.estimator``) are the entries of
``rlhf_ray.algorithms.ESTIMATORS``: this phase looks the name up there, hands the entry its
inputs (the old values only to an estimator that uses a critic; the KL coefficient only when
``ppo.kl_in`` is reward) and turns its metrics into numbers. Nothing here names an estimator.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf_ray.algorithms import ESTIMATORS, AdvantageInputs
from rlhf_ray.config import PPOConfig


class Advantages(NamedTuple):
    advantages: torch.Tensor  # (B, R) float32, 0 outside ``good``
    returns: torch.Tensor  # (B, R) float32 value targets (zeros for critic-free estimators)
    metrics: dict[str, float]


def estimate_advantages(p: PPOConfig, scores: torch.Tensor, kl: torch.Tensor, kl_coef: float,
                        values: torch.Tensor | None, groups: torch.Tensor, mask: torch.Tensor,
                        valid: torch.Tensor, actions: torch.Tensor | None = None,
                        turn_rewards: torch.Tensor | None = None) -> Advantages:
    """Advantages of one batch.

    Args:
        p: the PPO section (estimator, gamma, lam, lam_critic, lam_adaptive_alpha, kl_in, whitening,
            group_std_norm).
        scores: (B,) prepared outcome rewards (penalties, clipping, normalisation applied).
        kl: (B, R) per-token KL estimate of the old policy to the reference (0 at padding).
        kl_coef: the KL controller's current coefficient.
        values: (B, R) old values (read only by an estimator that uses a critic).
        groups: (B,) long, the prompt each sample answers.
        mask: (B, R) bool response mask (every row has a token; quarantined rows' inputs are zeroed).
        valid: (B,) bool, the usable (not quarantined) samples: only they enter any statistic, and the
            others get advantage 0.
        actions: (B, R) bool, the tokens the policy sampled (multi-turn episodes; None: all of ``mask``).
        turn_rewards: (B, R) float, an environment's rewards on its turns' last tokens (episodes; None: none).
    """
    estimator = ESTIMATORS[p.estimator]
    out = estimator.compute(AdvantageInputs(
        scores=scores, kl=kl, reward_kl_coef=kl_coef if p.kl_in == "reward" else 0.0,
        values=values if estimator.uses_critic else None, groups=groups, mask=mask, valid=valid,
        gamma=p.gamma, lam=p.lam, lam_critic=p.lam_critic,
        lam_adaptive_alpha=p.lam_adaptive_alpha, whiten=p.whiten_advantages, group_std_norm=p.group_std_norm,
        actions=actions, turn_rewards=turn_rewards))
    return Advantages(out.advantages, out.returns, {name: float(v) for name, v in out.metrics.items()})
