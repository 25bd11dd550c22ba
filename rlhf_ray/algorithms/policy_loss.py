"""Per-token policy losses, loss aggregation and off-policy correction.

The pieces a learner composes into one policy loss::

    corr = rollout_correction(old_lp, rollout_lp, mask, "tis")       # engine vs learner
    surr = clipped_surrogate(lp, old_lp, adv, corr.mask, 0.2)        # PPO / GSPO
    per_token = surr.per_token * corr.weights + beta * kl_loss_tokens(lp, ref_lp, "k3", mask=mask)
    loss = aggregate(per_token, mask, "token_mean", step_tokens=..., step_sequences=...)

``rlhf_ray.workers.objective.ppo_objective`` is the one place they are composed into the loss a
learner trains on (benchmarks call it too); there is no second policy-loss implementation.
Shapes: B sequences, R response tokens. Masks are bool, True = counts; inputs
at masked positions change neither the results nor their gradients.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .kl import kl_estimate
from .losses import _check_clip_args, _check_same_shape
from .masked import _check_mask, _mean, _zero_masked, masked_mean, masked_sum

RATIO_LEVELS = ("token", "sequence")
AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
CORRECTION_MODES = ("none", "tis", "icepop")


class SurrogateOutput(NamedTuple):
    """Result of :func:`clipped_surrogate`; every field is (B, R)."""

    per_token: torch.Tensor  # float, differentiable per-token loss; 0 at padding
    clipped: torch.Tensor  # bool: clipped term strictly larger (zero gradient); False at padding
    log_ratio: torch.Tensor  # float, detached log r used (token or sequence level); 0 at padding


class CorrectionOutput(NamedTuple):
    """Result of :func:`rollout_correction`; all detached."""

    weights: torch.Tensor  # float (B, R): multiplies the per-token loss; 0 where dropped, 1 at padding
    mask: torch.Tensor  # bool (B, R): tokens kept (icepop drops some)
    weight_mean: torch.Tensor  # 0-dim: mean raw weight w over valid tokens
    weight_max: torch.Tensor  # 0-dim: max raw weight w over valid tokens
    corrected_fraction: torch.Tensor  # 0-dim: share of valid tokens truncated / masked


def sequence_log_ratio(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """GSPO's length-normalised sequence log ratio, broadcast to the tokens.

    ``log s_i = (1 / |y_i|) * sum_t (log pi(y_t) - log pi_old(y_t))`` over the
    valid tokens of sequence i (Zheng et al. 2025, GSPO, arXiv:2507.18071).

    Args:
        logprobs: float (B, R) current log-probabilities (with grad).
        old_logprobs: float (B, R) log-probabilities at rollout time.
        mask: bool (B, R), True = real token.

    Returns:
        Float (B, R): ``log s_i`` at every valid token of row i, 0 at padding
        and on rows without a valid token. Differentiable w.r.t. ``logprobs``:
        each token of row i gets gradient ``1 / |y_i|`` of the row total.
    """
    _check_same_shape(logprobs, old_logprobs=old_logprobs)
    _check_mask(logprobs, mask, "logprobs")
    per_seq = masked_mean(logprobs - old_logprobs, mask, dim=-1)
    return _zero_masked(per_seq.unsqueeze(-1).expand_as(logprobs), mask)


def clipped_surrogate(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_ratio: float,
    *,
    clip_ratio_high: float | None = None,
    dual_clip: float | None = None,
    ratio: str = "token",
) -> SurrogateOutput:
    """Per-token clipped surrogate loss, token-level (PPO) or sequence-level (GSPO) ratio.

    Per valid token, with ratio r and advantage A::

        loss_t = max(-A * r, -A * clip(r, 1 - clip_ratio, 1 + clip_ratio_high))
        loss_t = min(loss_t, dual_clip * |A|)        only where A < 0, if dual_clip

    ``ratio="token"``: ``r_t = pi(y_t) / pi_old(y_t)`` (PPO, Schulman et al.
    2017, arXiv:1707.06347, eq. 7). ``ratio="sequence"``: every token of sequence i
    uses GSPO's ``s_i = exp(sequence_log_ratio)``, whose gradient reaches all
    tokens of the sequence. With one advantage per sequence this has the same
    gradient as the paper's GSPO-token variant; with per-token
    advantages it is the plain sequence-level form. GSPO uses much smaller
    clip ranges than PPO (the paper: 3e-4 and 4e-4).

    Args:
        logprobs: float (B, R) log pi(token), with grad.
        old_logprobs: float (B, R) log pi_old(token) (no grad).
        advantages: float (B, R) advantages (no grad).
        mask: bool (B, R), True = real token.
        clip_ratio: lower epsilon, in (0, 1].
        clip_ratio_high: upper epsilon; None = ``clip_ratio`` (DAPO clip-higher if larger).
        dual_clip: c > 1 of dual clip (Ye et al. 2020, arXiv:1912.09729); None = off.
        ratio: "token" or "sequence".

    Returns:
        SurrogateOutput. ``clipped`` marks tokens where the clipped term was
        strictly larger, so their gradient is zero (the learner's
        ``clip_fraction``; tokens capped by dual clip are not included).
    """
    _check_same_shape(logprobs, old_logprobs=old_logprobs, advantages=advantages)
    _check_mask(logprobs, mask, "logprobs")
    eps_high = _check_clip_args(clip_ratio, clip_ratio_high, dual_clip)
    if ratio == "token":
        # Zero the padding before exp(): garbage there could give inf, and inf
        # in a discarded branch still makes the gradient NaN (0 * inf).
        log_ratio = _zero_masked(logprobs - old_logprobs, mask)
    elif ratio == "sequence":
        log_ratio = sequence_log_ratio(logprobs, old_logprobs, mask)
    else:
        raise ValueError(f"unknown ratio level {ratio!r}; valid ones are {', '.join(RATIO_LEVELS)}")
    adv = _zero_masked(advantages, mask)
    r = torch.exp(log_ratio)
    unclipped = -adv * r
    clipped = -adv * r.clamp(1.0 - clip_ratio, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -dual_clip * adv), per_token)
    chosen = (clipped > unclipped).detach() & mask
    return SurrogateOutput(_zero_masked(per_token, mask), chosen, log_ratio.detach())


def _check_count(name: str, value: float | torch.Tensor) -> None:
    # A tensor count is trusted (checking it would sync with the device).
    if not isinstance(value, torch.Tensor) and not (value > 0 and math.isfinite(value)):
        raise ValueError(
            f"{name} must be a positive count (of the whole optimiser step, all ranks "
            f"and micro-batches), got {value}"
        )


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    step_tokens: float | torch.Tensor,
    step_sequences: float | torch.Tensor,
    max_len: int | None = None,
) -> torch.Tensor:
    """Reduce a per-token loss to the scalar this micro-batch contributes.

    Modes (names as in veRL's ``agg_loss``):

    - ``"token_mean"``: ``sum_valid(loss) / step_tokens`` (DAPO, arXiv:2503.14476, sec. 3.3).
    - ``"seq_mean_token_mean"``: ``sum_i mean_t(loss_i) / step_sequences``
      (the GRPO paper's form; a row with no valid token contributes 0).
    - ``"seq_mean_token_sum_norm"``: ``sum_i (sum_t loss_i / max_len) / step_sequences``
      (Dr. GRPO, arXiv:2503.20783, sec. 3.1: a constant length normaliser,
      usually the generation budget ``max_new_tokens``).

    The divisors are counts of the WHOLE optimiser step (all ranks, all
    micro-batches), so the SUM of the values of any row split of the step's
    batch equals the value of the whole batch. Engines that AVERAGE gradients
    over W ranks need the counts divided by W (see ``losses.py``).

    Args:
        per_token: float (B, R) per-token loss.
        mask: bool (B, R), True = counts.
        mode: one of ``AGGREGATION_MODES``.
        step_tokens: valid tokens in the step (used by "token_mean"), > 0.
        step_sequences: sequences in the step (the other modes), > 0.
        max_len: the constant normaliser of "seq_mean_token_sum_norm", > 0.

    Returns:
        0-dim tensor, differentiable.
    """
    _check_mask(per_token, mask, "per_token")
    if mode not in AGGREGATION_MODES:
        raise ValueError(
            f"unknown loss aggregation {mode!r}; valid ones are {', '.join(AGGREGATION_MODES)}"
        )
    if mode == "token_mean":
        _check_count("step_tokens", step_tokens)
        return masked_sum(per_token, mask) / step_tokens
    _check_count("step_sequences", step_sequences)
    row_sums = masked_sum(per_token, mask, dim=-1)
    if mode == "seq_mean_token_mean":
        per_seq = row_sums / mask.sum(dim=-1).clamp(min=1).to(row_sums.dtype)
    else:
        if max_len is None or max_len <= 0:
            raise ValueError(
                f"mode 'seq_mean_token_sum_norm' needs max_len > 0 (the constant length "
                f"normaliser, usually max_new_tokens), got {max_len}"
            )
        per_seq = row_sums / max_len
    return per_seq.sum() / step_sequences


def rollout_correction(
    old_logprobs: torch.Tensor,
    rollout_logprobs: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    cap: float = 2.0,
    low: float = 0.5,
    high: float = 2.0,
) -> CorrectionOutput:
    """Correct for the mismatch between the inference engine and the learner.

    The engine samples from pi_rollout, which differs from the learner's
    pi_old on the same weights (kernels, precision), or comes from the weights
    before the last update (async generation). Per valid token,
    ``w = exp(old_logprobs - rollout_logprobs) = pi_old / pi_rollout``.

    - ``"none"``: weights 1, mask unchanged (NaN rollout logprobs allowed).
    - ``"tis"``: truncated importance sampling, weights ``min(w, cap)``
      (Yao et al. 2025, "Your Efficient RL Framework Secretly Brings You
      Off-Policy RL Training", fengyao.notion.site).
    - ``"icepop"``: weights ``w`` where ``low <= w <= high``; tokens with w
      outside ``[low, high]`` get weight 0 and leave the mask (IcePop, Ling
      team 2025, Ring-1T report, arXiv:2510.18855: the policy-gradient term
      of each token is multiplied by M(w) = w inside the band, 0 outside).
      Aggregate the weighted loss over the INPUT mask to keep that paper's
      normaliser (a dropped token still counts in its sequence's length).

    Args:
        old_logprobs: float (B, R) learner log-probabilities at rollout time.
        rollout_logprobs: float (B, R) the engine's sampling log-probabilities;
            NaN where the engine returned none.
        mask: bool (B, R), True = real token.
        mode: one of ``CORRECTION_MODES``.
        cap: truncation of "tis", > 0.
        low, high: the kept window of "icepop", ``0 <= low <= 1 <= high``, low < high.

    Returns:
        CorrectionOutput, detached. ``weight_mean`` / ``weight_max`` describe
        the RAW w before truncation or masking (the mismatch itself; in mode
        "none", over the tokens whose rollout logprob is not NaN), 0 without
        valid tokens. Weights have the inputs' dtype, at least float32.

    Raises:
        ValueError: on an unknown mode, bad constants, or (modes "tis" and
        "icepop") a NaN rollout logprob at a valid token. That NaN check reads
        one flag back from the device.
    """
    _check_same_shape(old_logprobs, rollout_logprobs=rollout_logprobs)
    _check_mask(old_logprobs, mask, "old_logprobs")
    if mode not in CORRECTION_MODES:
        raise ValueError(
            f"unknown rollout correction {mode!r}; valid ones are {', '.join(CORRECTION_MODES)}"
        )
    if mode == "tis" and not cap > 0:
        raise ValueError(f"tis cap must be > 0, got {cap}")
    if mode == "icepop" and not (0.0 <= low <= 1.0 <= high and low < high):
        raise ValueError(f"icepop needs 0 <= low <= 1 <= high and low < high, got {low}, {high}")
    with torch.no_grad():
        rollout = rollout_logprobs.detach()
        missing = mask & torch.isnan(rollout)
        if mode != "none" and bool(missing.any()):
            raise ValueError(
                f"rollout_logprobs are NaN at {int(missing.sum())} valid tokens: the inference "
                f"engines did not return sampling logprobs, which rollout correction "
                f"{mode!r} needs. Make the engines return logprobs of the sampled tokens "
                "when correction is on, or set the correction mode to 'none'"
            )
        dtype = torch.promote_types(
            torch.promote_types(old_logprobs.dtype, rollout.dtype), torch.float32
        )
        known = mask & ~missing
        w = torch.exp(_zero_masked((old_logprobs.detach() - rollout).to(dtype), known))
        ones = torch.ones_like(w)
        new_mask, corrected, weights = mask, torch.zeros_like(mask), ones
        if mode == "tis":
            corrected = mask & (w > cap)
            weights = torch.where(mask, w.clamp(max=cap), ones)
        elif mode == "icepop":
            corrected = mask & ((w < low) | (w > high))
            new_mask = mask & ~corrected
            weights = torch.where(new_mask, w, torch.where(corrected, torch.zeros_like(w), ones))
        weight_max = _zero_masked(w, known).amax() if w.numel() else w.new_zeros(())
        return CorrectionOutput(
            weights=weights,
            mask=new_mask,
            weight_mean=_mean(w, known, None, False),
            weight_max=weight_max,
            corrected_fraction=_mean(corrected.to(dtype), mask, None, False),
        )


def kl_loss_tokens(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str,
    *,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Differentiable per-token KL penalty of the policy to the reference.

    With ``d = logprobs - ref_logprobs``: k1 = d, k2 = d^2 / 2,
    k3 = exp(-d) + d - 1 (Schulman 2020; :func:`~rlhf_ray.algorithms.kl_estimate`,
    whose autograd gradients are the analytic ones: 1, d and 1 - exp(-d)).
    As a loss on on-policy samples the expected gradients differ: k1's is 0,
    k2's is the gradient of KL(pi || ref), k3's that of KL(ref || pi)
    (e.g. Tang and Munos 2025, arXiv:2506.09477).

    Args:
        logprobs: float (B, R) log pi(token), with grad.
        ref_logprobs: float (B, R) log pi_ref(token) (no grad).
        estimator: "k1", "k2" or "k3".
        mask: optional bool (B, R); if given the result and its gradient are
            0 at masked positions whatever the inputs hold there.

    Returns:
        Float (B, R) per-token penalty, to be aggregated with :func:`aggregate`.
    """
    if mask is not None:
        _check_same_shape(logprobs, ref_logprobs=ref_logprobs)
        _check_mask(logprobs, mask, "logprobs")
        logprobs = _zero_masked(logprobs, mask)
        ref_logprobs = _zero_masked(ref_logprobs, mask)
    return kl_estimate(logprobs, ref_logprobs, estimator)
