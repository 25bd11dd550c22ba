"""Advantage estimators and their table: GAE, and the critic-free GRPO, Dr. GRPO, RLOO and REINFORCE++.

:data:`ESTIMATORS` is the one home of the ``ppo.estimator`` choice: name -> the function that
computes one batch's advantages from :class:`AdvantageInputs`, and what it needs (a critic's
values; prompt groups). The coordinator dispatches through it; the config's ``Literal`` of names
and its critic/group tuples mirror it (the config imports no torch) and a unit test fails when
they differ. Adding an estimator touches three files: its function and table entry here; its
name in ``rlhf_ray/config/ppo_section.py`` (the ``estimator`` field's ``Literal`` and doc, and
``CRITIC_ESTIMATORS`` / ``GROUP_ESTIMATORS`` when it uses a critic or groups); its hand-computed
case (``TABLE_EXPECTED``) and tests in ``tests/unit/test_estimators.py``.

Each prompt is sampled several times; the samples of one prompt form a group
and share a group id (``groups``, e.g. the prompt's index; ids need not be
contiguous or sorted). The baseline of a sample comes from the other samples
of its group instead of from a critic.

- GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, sec. 4.1.2):
  ``A = (s - mean_g) / (std_g + eps)``, std with Bessel's correction as in
  TRL's GRPOTrainer and veRL's ``compute_grpo_outcome_advantage``.
- Dr. GRPO (Liu et al. 2025, arXiv:2503.20783, sec. 3.1): the same without
  the division by the std, which biases towards too easy / too hard prompts.
- RLOO (Ahmadian et al. 2024, arXiv:2402.14740, eq. 4; Kool et al. 2019):
  ``A_i = s_i - mean of the other samples of the group``.
- REINFORCE++ (Hu 2025, arXiv:2501.03262, sec. 3): discounted return of the
  shaped per-token reward, whitened over the whole batch.

Validity: a quarantined sample is passed with an all-False mask row (or with
``valid`` False). It gets advantage 0 and is left out of every group statistic,
so that it cannot move any other sample's advantage, even if its score is NaN.
Shapes: B samples, R response tokens; masks are bool, True = counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from .gae import adaptive_lambda, compute_gae
from .masked import _check_mask, _zero_masked, explained_variance, masked_correlation, masked_mean, masked_whiten
from .shaping import shape_token_rewards


def _float_dtype(dtype: torch.dtype) -> torch.dtype:
    """At least float32: bf16 / fp16 / integer scores are promoted, float64 kept."""
    return torch.promote_types(dtype, torch.float32)


def _check_groups(groups: torch.Tensor, batch: int | None) -> None:
    """Raise unless ``groups`` is an integer (B,) tensor (B = ``batch`` if given)."""
    if groups.dim() != 1 or (batch is not None and groups.shape[0] != batch):
        want = "(B,)" if batch is None else f"({batch},)"
        raise ValueError(f"groups must have shape {want}, got {tuple(groups.shape)}")
    if groups.dtype.is_floating_point or groups.dtype.is_complex or groups.dtype == torch.bool:
        raise ValueError(f"groups must be an integer tensor of group ids, got dtype {groups.dtype}")


def _resolve_valid(valid: torch.Tensor | None, default: torch.Tensor) -> torch.Tensor:
    """``valid`` checked against the (B,) bool ``default``, or ``default`` if None."""
    if valid is None:
        return default
    if valid.dtype != torch.bool or valid.shape != default.shape:
        raise ValueError(
            f"valid must be a bool tensor of shape {tuple(default.shape)} (True = sample "
            f"counts), got dtype {valid.dtype} and shape {tuple(valid.shape)}"
        )
    return valid


def _check_outcome_inputs(
    scores: torch.Tensor, groups: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor | None
) -> torch.Tensor:
    """Validate the common arguments; return the (B,) bool validity."""
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        raise ValueError(
            f"mask must be a bool (B, R) tensor with B = {scores.shape[0]}, got dtype "
            f"{mask.dtype} and shape {tuple(mask.shape)}"
        )
    _check_groups(groups, scores.shape[0])
    return _resolve_valid(valid, mask.any(dim=-1))


def _dense_ids(groups: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Group ids renumbered 0..G-1 (long (B,)) and G.

    ``torch.unique`` syncs with the host once (its output size is data
    dependent); fine for a once-per-step computation.
    """
    unique, dense = torch.unique(groups, return_inverse=True)
    return dense, unique.numel()


def _group_stats(
    scores: torch.Tensor, groups: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample statistics of its group's valid samples.

    Returns ``(count, centered, sq_dev_sum)``, each (B,): the number of valid
    samples in the sample's group (long), ``score - group mean`` (0 for an
    invalid sample) and the group's sum of squared deviations from its mean.
    Invalid scores are replaced by 0 before any arithmetic (they may be NaN).
    """
    dtype = _float_dtype(scores.dtype)
    # index_add (not a one-hot matmul) keeps full precision even when TF32
    # matmuls are enabled.
    dense, num_groups = _dense_ids(groups)
    x = torch.where(valid, scores.to(dtype), torch.zeros((), dtype=dtype, device=scores.device))
    counts = torch.zeros(num_groups, dtype=torch.long, device=scores.device)
    counts = counts.index_add(0, dense, valid.long())
    sums = torch.zeros(num_groups, dtype=dtype, device=scores.device).index_add(0, dense, x)
    means = sums / counts.clamp(min=1).to(dtype)
    # Two passes (centre, then square) for accuracy, as in masked._var.
    centered = torch.where(valid, x - means[dense], torch.zeros_like(x))
    sq = torch.zeros(num_groups, dtype=dtype, device=scores.device)
    sq = sq.index_add(0, dense, centered.square())
    return counts[dense], centered, sq[dense]


def _broadcast(per_sample: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, R) on the valid tokens of valid samples, 0 elsewhere."""
    keep = mask & valid[:, None]
    return torch.where(keep, per_sample[:, None], torch.zeros_like(per_sample)[:, None])


def group_counts(groups: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Number of valid samples in each sample's group.

    Args:
        groups: integer (B,) group ids (any values, any order).
        valid: bool (B,), True = the sample counts; None = all count.

    Returns:
        Long (B,): for sample i, how many valid samples share ``groups[i]``
        (an invalid sample still gets its group's count of valid samples).
    """
    _check_groups(groups, None)
    valid = _resolve_valid(valid, torch.ones_like(groups, dtype=torch.bool))
    dense, num_groups = _dense_ids(groups)
    counts = torch.zeros(num_groups, dtype=torch.long, device=groups.device)
    return counts.index_add(0, dense, valid.long())[dense]


def grpo_advantages(
    scores: torch.Tensor,
    groups: torch.Tensor,
    mask: torch.Tensor,
    *,
    std_norm: bool = True,
    eps: float = 1e-6,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """GRPO outcome advantages, broadcast to every valid response token.

    ``A_i = (s_i - mean_g) / (std_g + eps)`` with ``std_norm``, else
    ``A_i = s_i - mean_g`` (Dr. GRPO). Mean and unbiased std (n - 1) are over
    the valid samples of the group. A group with a single valid sample has no
    baseline and gets advantage 0 (veRL instead gives it its raw score). A
    group whose scores are all equal gets 0 in both variants.

    Args:
        scores: float (B,) outcome reward per sample.
        groups: integer (B,) group id per sample (the prompt's index).
        mask: bool (B, R) response mask, True = real token.
        std_norm: divide by the group std (GRPO); False = Dr. GRPO.
        eps: added to the std before dividing, > 0 (veRL's 1e-6).
        valid: bool (B,), True = sample counts; default ``mask.any(-1)``.

    Returns:
        Float (B, R) advantages (dtype of ``scores``, at least float32), 0 at
        padding and on invalid samples.
    """
    valid = _check_outcome_inputs(scores, groups, mask, valid)
    if std_norm and eps <= 0:
        raise ValueError(f"eps must be > 0 when std_norm is on, got {eps}")
    counts, centered, sq_dev = _group_stats(scores, groups, valid)
    alone = counts < 2
    if std_norm:
        var = sq_dev / (counts - 1).clamp(min=1).to(sq_dev.dtype)
        centered = centered / (var.sqrt() + eps)
    per_sample = torch.where(alone, torch.zeros_like(centered), centered)
    return _broadcast(per_sample, mask, valid)


def rloo_advantages(
    scores: torch.Tensor,
    groups: torch.Tensor,
    mask: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE leave-one-out advantages, broadcast to every valid token.

    ``A_i = s_i - (sum_{j != i} s_j) / (n - 1)`` over the n valid samples of
    the group, computed as ``n / (n - 1) * (s_i - mean_g)`` (the same number).
    A group with one valid sample gets 0.

    Args:
        scores: float (B,) outcome reward per sample.
        groups: integer (B,) group id per sample.
        mask: bool (B, R) response mask, True = real token.
        valid: bool (B,), True = sample counts; default ``mask.any(-1)``.

    Returns:
        Float (B, R) advantages (dtype of ``scores``, at least float32), 0 at
        padding and on invalid samples.
    """
    valid = _check_outcome_inputs(scores, groups, mask, valid)
    counts, centered, _ = _group_stats(scores, groups, valid)
    n = counts.to(centered.dtype)
    per_sample = torch.where(
        counts < 2, torch.zeros_like(centered), centered * n / (n - 1.0).clamp(min=1.0)
    )
    return _broadcast(per_sample, mask, valid)


def group_baseline_scores(
    scores: torch.Tensor, groups: torch.Tensor, *, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Scores minus their group's mean over valid samples (REINFORCE++-baseline).

    Subtracted before reward shaping, as in REINFORCE++-baseline (Hu 2025,
    arXiv:2501.03262 v3+; veRL's ``reinforce_plus_plus_baseline``).

    Args:
        scores: float (B,) outcome reward per sample.
        groups: integer (B,) group id per sample.
        valid: bool (B,), True = sample counts; None = all count.

    Returns:
        Float (B,) (dtype of ``scores``, at least float32); 0 for invalid
        samples and for a group's only valid sample.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")
    _check_groups(groups, scores.shape[0])
    valid = _resolve_valid(valid, torch.ones_like(scores, dtype=torch.bool))
    return _group_stats(scores, groups, valid)[1]


def reinforce_pp_advantages(
    token_rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++ advantages: batch-whitened discounted returns of token rewards.

    ``G_t = sum_{k >= t, k valid} gamma^(k - t) r_k`` (k - t counts positions,
    so a hole in the mask is a step whose reward is 0), then
    ``A = masked_whiten(G)`` over all valid tokens of the batch.

    Args:
        token_rewards: float (B, R) shaped per-token rewards (score at the last
            token minus kl_coef * KL per token; see ``shape_token_rewards``).
        mask: bool (B, R) response mask, True = real token. Rewards at masked
            positions are ignored.
        gamma: discount in [0, 1]; 1 (the usual choice) sums the rewards.
        valid: bool (B,), True = sample counts; default ``mask.any(-1)``.
            Tokens of invalid samples count as padding.

    Returns:
        ``(advantages, returns)``, float (B, R) of ``token_rewards``' dtype,
        0 at padding and on invalid samples. The whitening statistics are
        those of this batch (local to the caller's rank).
    """
    _check_mask(token_rewards, mask, "token_rewards")
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (B, R), got shape {tuple(mask.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must lie in [0, 1], got {gamma}")
    keep = mask & _resolve_valid(valid, mask.any(dim=-1))[:, None]
    rewards = _zero_masked(token_rewards, keep)
    if gamma == 1.0:
        # Undiscounted: a reversed cumulative sum, no loop over R.
        returns = rewards.flip(1).cumsum(1).flip(1)
    else:
        running = torch.zeros_like(rewards[:, 0])
        reversed_returns = []
        for t in reversed(range(rewards.shape[1])):
            running = rewards[:, t] + gamma * running
            reversed_returns.append(running)
        returns = torch.stack(reversed_returns[::-1], dim=1) if reversed_returns else rewards
    returns = _zero_masked(returns, keep)
    return masked_whiten(returns, keep), returns


# --------------------------------------------------------------------------- the estimator table


class AdvantageInputs(NamedTuple):
    """One iteration's scored batch, as every estimator of :data:`ESTIMATORS` receives it."""

    scores: torch.Tensor  # (B,) float outcome rewards (penalties, clipping, normalisation applied)
    kl: torch.Tensor  # (B, R) float per-token KL of the old policy to the reference, 0 at padding
    reward_kl_coef: float  # weight of the KL penalty in the reward; 0 when the KL is a loss term
    values: torch.Tensor | None  # (B, R) float old values; given to (and read by) uses_critic estimators only
    groups: torch.Tensor  # (B,) integer group id: the prompt each sample answers
    mask: torch.Tensor  # (B, R) bool response mask
    valid: torch.Tensor  # (B,) bool usable samples: only they enter a statistic, the others get 0
    gamma: float  # discount in [0, 1]
    lam: float  # GAE lambda of the advantages, in [0, 1]
    whiten: bool  # gae: whiten the advantages over the batch's valid tokens
    group_std_norm: bool  # grpo: divide by the group std (False: Dr. GRPO)
    lam_critic: float | None = None  # gae: GAE lambda of the value targets (the returns); None: lam
    lam_adaptive_alpha: float | None = None  # gae: length-adaptive advantage lambda 1 - 1/(alpha x length); None: lam
    actions: torch.Tensor | None = None  # (B, R) bool tokens the policy sampled (episodes), within mask; None: mask
    turn_rewards: torch.Tensor | None = None  # (B, R) float environment rewards on turns' last tokens; None: none


def _actions(x: AdvantageInputs) -> torch.Tensor:
    """(B, R) bool: the policy's tokens. In an episode the observations between its turns are real
    tokens (``mask``) but not actions: they get no advantage, no KL and no reward of their own."""
    return x.mask if x.actions is None else x.actions


def _token_rewards(x: AdvantageInputs, scores: torch.Tensor) -> torch.Tensor:
    """(B, R) per-token rewards on the actions: ``scores`` on each sample's last action, minus
    reward_kl_coef x KL on every action, plus the environment's turn rewards (on turns' last tokens)."""
    actions = _actions(x)
    rewards = shape_token_rewards(scores, x.kl * actions, actions, x.reward_kl_coef)
    if x.turn_rewards is not None:
        rewards = rewards + x.turn_rewards.to(rewards.dtype) * actions
    return rewards


class AdvantageOutput(NamedTuple):
    advantages: torch.Tensor  # (B, R) float, 0 outside mask & valid
    returns: torch.Tensor  # (B, R) float value targets (zeros for critic-free estimators)
    metrics: dict[str, torch.Tensor]  # 0-dim tensors named as logged; the caller turns them into numbers


@dataclass(frozen=True)
class Estimator:
    """An entry of :data:`ESTIMATORS`."""

    compute: Callable[[AdvantageInputs], AdvantageOutput]
    uses_critic: bool  # reads the old values: the learner trains a value head and a value loss
    uses_groups: bool  # compares the samples of one prompt: needs >= 2 samples per prompt


def _good(x: AdvantageInputs) -> torch.Tensor:
    """(B, R) bool: the actions (the valid tokens of a single response) of the usable samples."""
    return _actions(x) & x.valid[:, None]


def _gae(x: AdvantageInputs) -> AdvantageOutput:
    """GAE (Schulman et al. 2016, arXiv:1506.02438) on the learned values of per-token rewards (the
    score at the last token, minus reward_kl_coef x KL on every token), whitened over the batch's
    valid tokens when ``whiten``; the returns are the value targets.

    The advantages use ``lam`` (or, with ``lam_adaptive_alpha``, each response's length-adaptive
    lambda, :func:`adaptive_lambda`), the value targets ``lam_critic``: decoupled as in VAPO
    (arXiv:2504.05118), whose critic takes lambda 1 (unbiased Monte-Carlo targets) while the
    policy keeps a lower-variance lambda. Equal lambdas give one GAE pass.

    Value diagnostics beside the explained variance: the Pearson correlation of values and returns
    over valid tokens, and the mean value at each response's first token against the mean return
    there (with gamma 1 and lam_critic 1 that return is the sample's whole shaped reward)."""
    if x.values is None:
        raise ValueError("gae needs the old values (B, R) of a critic")
    good, actions = _good(x), _actions(x)
    rewards = _token_rewards(x, x.scores)
    lam = x.lam if x.lam_adaptive_alpha is None else adaptive_lambda(actions.sum(-1), x.lam_adaptive_alpha)
    actor = compute_gae(rewards, x.values, x.mask, x.gamma, lam, action_mask=actions)
    lam_critic = x.lam if x.lam_critic is None else x.lam_critic
    same = x.lam_adaptive_alpha is None and lam_critic == x.lam
    returns = actor.returns if same else compute_gae(rewards, x.values, x.mask, x.gamma, lam_critic,
                                                     action_mask=actions).returns
    advantages = masked_whiten(actor.advantages, good) if x.whiten else actor.advantages * good
    first = x.valid & x.mask[:, 0]  # responses are right-padded: position 0 is each one's first token
    metrics = {"shaped_reward_mean": rewards.sum(-1)[x.valid].mean(),
               "advantage_mean_raw": masked_mean(actor.advantages, good),
               "return_mean": masked_mean(returns, good),
               "value_mean": masked_mean(x.values, good),
               "explained_variance": explained_variance(x.values, returns, good),
               "value_return_corr": masked_correlation(x.values, returns, good),
               "value_first_token_mean": x.values[:, 0][first].mean(),
               "return_first_token_mean": returns[:, 0][first].mean()}
    if x.lam_adaptive_alpha is not None:
        metrics["lam_actor_mean"] = lam[x.valid].mean()
    return AdvantageOutput(advantages, returns * good, metrics)


def _critic_free(x: AdvantageInputs, advantages: torch.Tensor, shaped: torch.Tensor) -> AdvantageOutput:
    """Zero returns (no value targets) and the metrics every critic-free estimator logs;
    ``shaped`` is each sample's (B,) reward after the KL penalty."""
    good = _good(x)
    metrics = {"shaped_reward_mean": shaped[x.valid].mean(), "advantage_abs_mean": masked_mean(advantages.abs(), good)}
    return AdvantageOutput(advantages * good, torch.zeros_like(advantages), metrics)


def _outcome(x: AdvantageInputs) -> torch.Tensor:
    """(B,) score minus reward_kl_coef x the sample's summed KL (plus an episode's turn rewards): one
    outcome per sequence."""
    outcome = x.scores - x.reward_kl_coef * (x.kl * _good(x)).sum(-1)
    if x.turn_rewards is not None:
        outcome = outcome + (x.turn_rewards * _good(x)).sum(-1).to(outcome.dtype)
    return outcome


def _grpo(x: AdvantageInputs) -> AdvantageOutput:
    """GRPO: the outcome against its prompt group, divided by the group std unless
    ``group_std_norm`` is off (Dr. GRPO); see :func:`grpo_advantages`."""
    outcome = _outcome(x)
    advantages = grpo_advantages(outcome, x.groups, _good(x), std_norm=x.group_std_norm, valid=x.valid)
    return _critic_free(x, advantages, outcome)


def _rloo(x: AdvantageInputs) -> AdvantageOutput:
    """RLOO: the outcome minus the mean of the other samples of its group; see :func:`rloo_advantages`."""
    outcome = _outcome(x)
    return _critic_free(x, rloo_advantages(outcome, x.groups, _good(x), valid=x.valid), outcome)


def _reinforce_pp(x: AdvantageInputs, scores: torch.Tensor | None = None) -> AdvantageOutput:
    """REINFORCE++: returns of the per-token rewards (score at the last token minus the KL
    penalty), whitened over the batch; see :func:`reinforce_pp_advantages`."""
    rewards = _token_rewards(x, x.scores if scores is None else scores)
    advantages, _ = reinforce_pp_advantages(rewards, _good(x), gamma=x.gamma, valid=x.valid)
    return _critic_free(x, advantages, rewards.sum(-1))


def _reinforce_pp_baseline(x: AdvantageInputs) -> AdvantageOutput:
    """REINFORCE++-baseline: REINFORCE++ on the scores minus their group's mean
    (:func:`group_baseline_scores`)."""
    return _reinforce_pp(x, group_baseline_scores(x.scores, x.groups, valid=x.valid))


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(_gae, uses_critic=True, uses_groups=False),
    "grpo": Estimator(_grpo, uses_critic=False, uses_groups=True),
    "rloo": Estimator(_rloo, uses_critic=False, uses_groups=True),
    "reinforce_pp": Estimator(_reinforce_pp, uses_critic=False, uses_groups=False),
    "reinforce_pp_baseline": Estimator(_reinforce_pp_baseline, uses_critic=False, uses_groups=True),
}
