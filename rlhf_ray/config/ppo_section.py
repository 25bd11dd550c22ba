"""The ``ppo`` section of the PPO config tree: the algorithm's settings (estimator, losses, KL,
clipping, correction, dynamic sampling). Kept beside ``schema.py`` (which imports it into the tree)
because it is the longest section. Standard library only.

The algorithm's choices are ``Literal`` annotations (:mod:`rlhf_ray.config.choices`) that mirror
the tables of ``rlhf_ray.algorithms`` (``ESTIMATORS``, ``KL_ESTIMATORS``, ``AGGREGATION_MODES``,
``RATIO_LEVELS``, ``CORRECTION_MODES``; ``auto`` is the config's own); this package imports no
torch, so it cannot read them, and ``tests/unit/test_choices.py`` fails when the two differ.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

AUTO = "auto"  # a choice derived from the settings it depends on (see PPOConfig.resolved)

# What validation and the learner need to know of each ppo.estimator, as the estimator table
# (rlhf_ray.algorithms.ESTIMATORS: uses_critic, uses_groups) says.
CRITIC_ESTIMATORS = ("gae",)
GROUP_ESTIMATORS = ("grpo", "rloo", "reinforce_pp_baseline")


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
    """GAE lambda of the advantages (and of the value targets unless ppo.lam_critic is set)."""
    lam_critic: float | None = None
    """GAE lambda of the value targets (the returns the value head regresses on), decoupled from the
    advantages' ppo.lam (VAPO: 1.0, unbiased Monte-Carlo targets for the critic); unset: ppo.lam. gae only."""
    lam_adaptive_alpha: float | None = None
    """Length-adaptive advantage lambda per response, 1 - 1/(alpha x response length) clipped to [0, 1]
    (VAPO's alpha: 0.05; length 100 -> 0.8); replaces ppo.lam for the advantages, not for the value
    targets. Unset: ppo.lam for every response. gae only."""
    critic_warmup_iterations: int = 0
    """Critic warm-up: the first N iterations train only the critic, on fresh rollouts of the initial policy,
    which stays exactly as it is (no policy loss, no optimiser step on it, no weight sync, the KL to the
    reference stays where it started and the KL controller does not adapt). Each runs ppo.epochs +
    ppo.critic_epochs value-only epochs. Shared body: the value head alone (the body IS the policy: no gradient
    reaches it and the engine takes no step, so the policy's learning-rate schedule starts with the first PPO
    iteration). model.separate_critic: the critic's head and, with model.value_grad_to_body, its body; the policy's
    parameter group is held out of those steps (weights, Adam moments and step counts unchanged), but the one
    schedule both bodies share counts them. 0: off. gae only."""
    critic_epochs: int = 0
    """Value-only epochs after the ppo.epochs of every iteration: the same mini-batches and micro-batches with
    the value loss alone (ppo.vf_coef x the clipped value loss). What they do to the policy: with
    model.value_grad_to_body false, nothing (the head alone trains; the body takes no step); with
    model.separate_critic, nothing (the critic body and head train, the policy's parameter group is held
    exactly); with the shared body and value_grad_to_body true (the default), the policy moves: the body is
    trained on the value loss alone, and AdamW's momentum from the PPO epochs (and weight decay) keep moving every
    policy weight (the LM head too) in those steps, which also advance the policy's learning-rate schedule. 0: off.
    gae only."""
    kl_coef: float = 0.02
    """Initial coefficient of the per-token KL penalty to the reference."""
    kl_estimator: Literal["auto", "k1", "k2", "k3"] = "auto"
    """KL estimator: k1 in the reward (ppo.kl_in reward); k2 or k3 as a loss term (ppo.kl_in loss). auto:
    k1 with ppo.kl_in reward, k3 with ppo.kl_in loss. k1 as a loss term is refused: on the policy's own samples its
    expected gradient is zero, so it would not pull the policy toward the reference at all."""
    kl_in: Literal["reward", "loss"] = "reward"
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
    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"] = "gae"
    """Advantage estimator. gae: a learned value (shared body or separate critic) and GAE. Critic-free, no
    value network at all: grpo (score minus its prompt group's mean, divided by the group's std unless
    ppo.group_std_norm is false: Dr. GRPO), rloo (leave-one-out group baseline), reinforce_pp (REINFORCE++:
    token rewards with the KL penalty, returns whitened over the batch), reinforce_pp_baseline (the group
    mean subtracted from the score first). The group estimators need rollout.samples_per_prompt >= 2."""
    group_std_norm: bool = True
    """grpo: divide by the group's reward std (false: Dr. GRPO, mean subtraction only)."""
    loss_agg: Literal["auto", "token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "auto"
    """Policy-loss aggregation over an optimiser step: token_mean (every token alike), seq_mean_token_mean
    (each sequence's token mean, averaged over sequences), seq_mean_token_sum_norm (each sequence's token
    sum divided by rollout.max_new_tokens, averaged over sequences: Dr. GRPO). 1 and N learner ranks give
    the same update in each mode. auto: seq_mean_token_mean with ppo.ratio sequence, else token_mean."""
    ratio: Literal["token", "sequence"] = "token"
    """Importance ratio of the clipped objective: token (PPO) or sequence (GSPO: exp of the mean log-ratio of
    the sequence's tokens, one ratio per sequence). sequence needs ppo.loss_agg seq_mean_token_mean (GSPO
    averages sequences; the other modes weight each sequence by its length and are refused)."""
    rollout_correction: Literal["auto", "none", "tis", "icepop"] = "auto"
    """Correction for the gap between the engines' sampling policy and the learner's old policy (async
    generation is one step off-policy; bf16 engines differ numerically), with the weight
    w = exp(old - rollout logprob) of each token: none, tis (the policy loss of each token weighted by
    min(w, ppo.correction_cap)) or icepop (weighted by w where w is within [ppo.correction_low,
    ppo.correction_high], left out of the policy loss elsewhere). On, the engines return logprobs every
    iteration. auto: tis with rollout.max_staleness >= 1 (or async_generation), else none; none there trains
    on older weights' samples uncorrected."""
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

    def resolved(self, staleness: int) -> "PPOConfig":
        """This section with each ``auto`` choice filled in from the settings it depends on, as the
        fields' docs say; a choice that was given is kept as it is (validation refuses what cannot work).
        ``staleness``: the staleness bound that runs (``RolloutConfig.staleness``)."""
        derived = {
            # k1's expected gradient as a loss is zero; k3 is the usual GRPO loss term (Schulman 2020).
            "kl_estimator": "k3" if self.kl_in == "loss" else "k1",
            # GSPO (arXiv:2507.18071) averages one clipped term per sequence.
            "loss_agg": "seq_mean_token_mean" if self.ratio == "sequence" else "token_mean",
            # Pipelined batches come from older weights than the learner's: correct toward them.
            "rollout_correction": "tis" if staleness > 0 else "none",
        }
        unset = {name: value for name, value in derived.items() if getattr(self, name) == AUTO}
        return dataclasses.replace(self, **unset) if unset else self

    @property
    def uses_critic(self) -> bool:
        """Whether the estimator learns a value (gae); the others train no value network at all."""
        return self.estimator in CRITIC_ESTIMATORS

    @property
    def uses_groups(self) -> bool:
        """Estimators that compare the samples of one prompt (or dynamic sampling, which drops groups)."""
        return self.estimator in GROUP_ESTIMATORS or self.dynamic_sampling
    max_bad_iterations: int = 3
    """Stop with an explanation after this many consecutive iterations with no usable sample (NaN/inf)."""
