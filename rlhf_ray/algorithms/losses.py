"""The value loss, the token-mean aggregation and the clip-argument checks (the policy losses are in
policy_loss.py).

Normalisation: every loss here is ``sum over valid tokens / num_tokens``.
``num_tokens`` defaults to the local valid-token count, but trainers pass the
token count of the whole optimiser step (all data-parallel ranks, all
micro-batches). Then the SUM of the per-micro-batch, per-rank losses (and
gradients) is exactly the full-batch loss, instead of giving the tokens of
small micro-batches more weight. Engines that AVERAGE gradients over W ranks
(DDP, DeepSpeed) need ``num_tokens = global_count / W`` to get the same
update. This is the "token-mean" aggregation discussed in DAPO (Yu et al.
2025, arXiv:2503.14476, sec. 3.3) and in the Hugging Face blog post on the
gradient-accumulation loss bug (Oct 2024).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .masked import _check_mask, _mean, _zero_masked


class ValueLossOutput(NamedTuple):
    """Result of :func:`value_loss`; metrics are detached 0-dim tensors."""

    loss: torch.Tensor  # 0-dim, differentiable
    clip_fraction: torch.Tensor  # share of tokens where the clipped term was chosen


def _check_same_shape(reference: torch.Tensor, **others: torch.Tensor) -> None:
    for name, x in others.items():
        if x.shape != reference.shape:
            raise ValueError(
                f"{name} shape {tuple(x.shape)} != expected {tuple(reference.shape)}"
            )


def token_mean_loss(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum(per_token[mask]) / num_tokens``: the loss aggregation used here.

    Args:
        per_token: float (B, R) per-token losses.
        mask: bool (B, R), True = counts.
        num_tokens: divisor; None uses the local ``mask.sum()`` (at least 1, so
            an all-padding batch gives 0). Pass the global token count of the
            optimiser step so that losses of a split batch sum to the full one.

    Returns:
        0-dim tensor of ``per_token.dtype``, differentiable.
    """
    _check_mask(per_token, mask, "per_token")
    total = _zero_masked(per_token, mask).sum()
    if num_tokens is None:
        num_tokens = mask.sum().clamp(min=1).to(per_token.dtype)
    elif not isinstance(num_tokens, torch.Tensor) and num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return total / num_tokens


def _check_clip_args(
    clip_ratio: float, clip_ratio_high: float | None, dual_clip: float | None
) -> float:
    """Validate the clip constants; return the upper epsilon."""
    eps_high = clip_ratio if clip_ratio_high is None else clip_ratio_high
    if not 0 < clip_ratio <= 1 or eps_high <= 0:
        raise ValueError(
            f"need 0 < clip_ratio <= 1 and clip_ratio_high > 0, got {clip_ratio}, {eps_high}"
        )
    if dual_clip is not None and dual_clip <= 1:
        raise ValueError(f"dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")
    return eps_high


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float | None = None,
    num_tokens: float | torch.Tensor | None = None,
) -> ValueLossOutput:
    """Squared-error critic loss, optionally with PPO2-style value clipping.

    Unclipped, per token: ``0.5 * (V - G)^2``.

    Clipped (``clip_range = c``), as in OpenAI baselines ppo2 (the pessimistic
    max; NOT clipping the prediction to a fixed range)::

        V_clip = V_old + clamp(V - V_old, -c, c)
        loss_t = 0.5 * max((V - G)^2, (V_clip - G)^2)

    Args:
        values: float (B, R) current critic predictions V (with grad).
        old_values: float (B, R) predictions V_old from the rollout (no grad).
        returns: float (B, R) targets G, e.g. ``compute_gae(...).returns``.
        mask: bool (B, R), True = real response token. Inputs at masked
            positions change neither the loss nor its gradient.
        clip_range: c > 0, or None for the unclipped loss.
        num_tokens: loss divisor, see :func:`token_mean_loss`.

    Returns:
        ValueLossOutput; ``clip_fraction`` is the share of valid tokens where
        the clipped term was strictly larger (0 when ``clip_range`` is None).
    """
    _check_same_shape(values, old_values=old_values, returns=returns)
    _check_mask(values, mask, "values")
    if clip_range is not None and clip_range <= 0:
        raise ValueError(f"clip_range must be > 0 (or None to disable), got {clip_range}")

    values = _zero_masked(values, mask)
    returns = _zero_masked(returns, mask)
    unclipped = (values - returns).square()
    if clip_range is None:
        per_token = 0.5 * unclipped
        clip_fraction = torch.zeros((), dtype=values.dtype, device=values.device)
    else:
        old_values = _zero_masked(old_values, mask)
        v_clip = old_values + (values - old_values).clamp(-clip_range, clip_range)
        clipped = (v_clip - returns).square()
        per_token = 0.5 * torch.maximum(unclipped, clipped)
        with torch.no_grad():
            clip_fraction = _mean((clipped > unclipped).to(values.dtype), mask, None, False)
    loss = token_mean_loss(per_token, mask, num_tokens)
    return ValueLossOutput(loss, clip_fraction)
