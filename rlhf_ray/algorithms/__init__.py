"""Pure-torch RL math for PPO on language models.

Masked reductions, GAE, the advantage estimators' table (``ESTIMATORS``), KL
estimators and controllers, reward shaping, token log-probabilities and the PPO
losses. Everything here is a function of tensors and named scalars; this package
imports only the standard library and torch (``tests/unit/test_algorithms_pure.py``
enforces it).

Vocabulary: B sequences, R response tokens, V vocab. Masks are bool, True = counts.
"""

from .gae import GAEOutput, adaptive_lambda, check_right_padded, compute_gae
from .estimators import (ESTIMATORS, AdvantageInputs, AdvantageOutput, Estimator, grpo_advantages,
                         group_baseline_scores, group_counts, reinforce_pp_advantages, rloo_advantages)
from .kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_estimate
from .logprobs import chunked_logprobs_and_entropy, entropy_from_logits, logprobs_and_entropy, logprobs_from_logits
from .losses import (
    ValueLossOutput,
    token_mean_loss,
    value_loss,
)
from .pairwise import PairwiseLossOutput, SFTLossOutput, pairwise_loss, sft_loss
from .overlong import overlong_penalty
from .policy_loss import (AGGREGATION_MODES, CORRECTION_MODES, RATIO_LEVELS, CorrectionOutput,
                          SurrogateOutput, aggregate, clipped_surrogate, kl_loss_tokens, rollout_correction,
                          sequence_log_ratio)
from .masked import (
    explained_variance,
    masked_correlation,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)
from .shaping import (
    RunningMoments,
    apply_missing_eos_penalty,
    clip_scores,
    normalize_scores,
    shape_token_rewards,
)

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "GAEOutput",
    "PairwiseLossOutput",
    "SFTLossOutput",
    "RunningMoments",
    "ValueLossOutput",
    "apply_missing_eos_penalty",
    "check_right_padded",
    "clip_scores",
    "compute_gae",
    "adaptive_lambda",
    "chunked_logprobs_and_entropy",
    "entropy_from_logits",
    "explained_variance",
    "masked_correlation",
    "kl_estimate",
    "logprobs_and_entropy",
    "logprobs_from_logits",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "normalize_scores",
    "pairwise_loss",
    "sft_loss",
    "shape_token_rewards",
    "token_mean_loss",
    "value_loss",
    # the estimator table, critic-free estimators, policy-loss pieces, overlong shaping
    "ESTIMATORS", "AdvantageInputs", "AdvantageOutput", "Estimator",
    "AGGREGATION_MODES", "CORRECTION_MODES", "RATIO_LEVELS", "CorrectionOutput", "SurrogateOutput",
    "aggregate", "clipped_surrogate", "grpo_advantages", "group_baseline_scores", "group_counts",
    "kl_loss_tokens", "overlong_penalty", "reinforce_pp_advantages", "rloo_advantages",
    "rollout_correction", "sequence_log_ratio",
]
