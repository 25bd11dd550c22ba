"""The ``ppo`` section of the PPO config tree: the algorithm's settings (estimator, losses, KL,
clipping, correction, dynamic sampling). Kept beside ``schema.py`` (which imports it into the tree)
because it is the longest section. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PPOConfig:
    iterations: int = 100
    """PPO iterations (rollout + update) to run."""
    epochs: int = 1
    """Passes over each iteration's experience."""
    mini_batches: int = 2
    """Optimiser steps per epoch; each learner rank splits its share of the iteration's samples into
    this many mini-batches."""
    clip_ratio: float = 0.2
    """PPO clip epsilon (lower side, and upper side unless ppo.clip_ratio_high is set)."""
    clip_ratio_high: float | None = None
    """Separate upper clip epsilon (asymmetric clipping)."""
    dual_clip: float | None = None
    """Dual-clip constant c > 1 bounding the loss of negative-advantage tokens; unset disables it."""
    value_clip: float | None = 0.2
    """Clip new values to old_values +- value_clip in the value loss; unset disables clipping."""
    vf_coef: float = 0.1
    """Weight of the value loss in the shared-body total loss."""
    entropy_coef: float = 0.0
    """Weight of the entropy bonus (subtracted from the loss)."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    kl_coef: float = 0.02
    """Initial coefficient of the per-token KL penalty to the reference."""
    kl_estimator: str = "k1"
    """KL estimator: k1 in the reward (ppo.kl_in reward); k1, k2 or k3 as a loss term (ppo.kl_in loss)."""
    kl_in: str = "reward"
    """Where the KL penalty to the reference goes: reward (per-token, shaped into the rewards before the
    advantages; only k1 belongs there) or loss (a term ppo.kl_coef x KL(policy || reference) added to the
    policy loss, aggregated like it: GRPO's choice)."""
    kl_target: float | None = None
    """If set, adapt the KL coefficient towards this per-sequence KL (Ziegler et al. 2019)."""
    kl_horizon: int = 10000
    """Horizon (in samples) of the adaptive KL controller."""
    whiten_advantages: bool = True
    """Normalise GAE advantages to zero mean, unit variance over the iteration's valid tokens (ppo.estimator
    gae; the critic-free estimators normalise in their own way)."""
    estimator: str = "gae"
    """Advantage estimator. gae: a learned value (shared body or separate critic) and GAE. Critic-free, no
    value network at all: grpo (score minus its prompt group's mean, divided by the group's std unless
    ppo.group_std_norm is false: Dr. GRPO), rloo (leave-one-out group baseline), reinforce_pp (REINFORCE++:
    token rewards with the KL penalty, returns whitened over the batch), reinforce_pp_baseline (the group
    mean subtracted from the score first). The group estimators need rollout.samples_per_prompt >= 2."""
    group_std_norm: bool = True
    """grpo: divide by the group's reward std (false: Dr. GRPO, mean subtraction only)."""
    loss_agg: str = "token_mean"
    """Policy-loss aggregation over an optimiser step: token_mean (every token alike), seq_mean_token_mean
    (each sequence's token mean, averaged over sequences), seq_mean_token_sum_norm (each sequence's token
    sum divided by rollout.max_new_tokens, averaged over sequences: Dr. GRPO). 1 and N learner ranks give
    the same update in each mode."""
    ratio: str = "token"
    """Importance ratio of the clipped objective: token (PPO) or sequence (GSPO: exp of the mean log-ratio of
    the sequence's tokens, one ratio per sequence)."""
    rollout_correction: str = "none"
    """Correction for the gap between the engines' sampling policy and the learner's old policy (async
    generation is one step off-policy; bf16 engines differ numerically): none, tis (truncated importance
    weights exp(old - rollout logprob) capped at ppo.correction_cap) or icepop (tokens whose weight is
    outside [ppo.correction_low, ppo.correction_high] are left out of the loss). On, the engines return
    logprobs every iteration."""
    correction_cap: float = 2.0
    """tis: cap C of the truncated importance weight."""
    correction_low: float = 0.5
    """icepop: lower bound of the kept importance weights."""
    correction_high: float = 2.0
    """icepop: upper bound of the kept importance weights."""
    dynamic_sampling: bool = False
    """DAPO dynamic sampling: drop prompt groups whose samples all got the same reward (they carry no
    group-relative signal) and generate more prompts until the batch is full, at most
    ppo.max_extra_generations times; a batch still short is filled with the dropped groups (counted)."""
    max_extra_generations: int = 4
    """Dynamic sampling: extra generation rounds per iteration at most."""
    overlong_buffer: int = 0
    """DAPO overlong soft penalty: responses longer than rollout.max_new_tokens - this many tokens lose up to
    ppo.overlong_penalty, linearly (0: off)."""
    overlong_penalty: float = 1.0
    """The overlong soft penalty at rollout.max_new_tokens tokens."""

    @property
    def uses_critic(self) -> bool:
        """Only gae learns a value; the other estimators train no value network at all."""
        return self.estimator == "gae"

    @property
    def uses_groups(self) -> bool:
        """Estimators that compare the samples of one prompt (or dynamic sampling, which drops groups)."""
        return self.estimator in ("grpo", "rloo", "reinforce_pp_baseline") or self.dynamic_sampling
    max_bad_iterations: int = 3
    """Stop with an explanation after this many consecutive iterations with no usable sample (NaN/inf)."""
