"""Generalized Advantage Estimation over response tokens.

Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
Advantage Estimation" (arXiv:1506.02438), eq. 16 in its recursive form:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}

Each response is one episode. The episode ends after the last valid token, so the
bootstrap value there is 0. In a single-turn response every token is one action. In a
multi-turn episode the response region also holds observation tokens (a tool's output, a
user's reply) that the policy did not sample: ``action_mask`` marks the sampled ones, and the
recursion steps over the others, carrying V_{t+1} and A_{t+1} across them, so the last action
of one turn bootstraps from the first action of the next (as veRL's multi-turn GAE does).
Observation tokens get advantage and return 0. A per-turn reward goes on its turn's last
action token.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .masked import _check_mask, _zero_masked


class GAEOutput(NamedTuple):
    """Result of :func:`compute_gae`; both fields are 0 where the mask is False."""

    advantages: torch.Tensor  # float (B, R), A_t
    returns: torch.Tensor  # float (B, R), A_t + V_t: the critic's regression target


def check_right_padded(mask: torch.Tensor) -> None:
    """Raise ValueError unless each row of the bool (B, R) ``mask`` is True* False*.

    Right padding is what makes "the value after the last valid token is 0"
    the same thing as "the value at the next (padded) position is 0".
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be 2-D (B, R), got shape {tuple(mask.shape)}")
    # A False followed by a True anywhere in a row means a hole or left padding.
    reopened = (~mask[:, :-1]) & mask[:, 1:]
    if bool(reopened.any()):
        rows = reopened.any(dim=1).nonzero().flatten().tolist()
        raise ValueError(
            "compute_gae needs a right-padded response mask (each row: valid tokens "
            f"first, then padding), but rows {rows[:8]} have a valid token after "
            "padding; left-padded responses must be shifted to the left first"
        )


def compute_gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float,
    lam: float | torch.Tensor,
    action_mask: torch.Tensor | None = None,
) -> GAEOutput:
    """Per-token GAE advantages and returns for right-padded responses.

    Args:
        rewards: float (B, R) per-token rewards r_t.
        values: float (B, R) critic values V_t of the state before token t.
        mask: bool (B, R), True = real response token; each row must be
            right-padded (a prefix of True then False), else ValueError.
        gamma: discount factor in [0, 1].
        lam: GAE lambda in [0, 1], one for every row or a float (B,) tensor
            of one per row (a length-adaptive lambda, :func:`adaptive_lambda`).
        action_mask: bool (B, R), True = a token the policy sampled, within
            ``mask`` (None: every valid token). The other valid tokens are
            observations: skipped by the recursion, rewards and values there
            affect nothing. With no observation token the result is exactly
            the single-turn one.

    Example (gamma 1, lam 0.5): tokens action, action, obs, obs, action with
    rewards [0, .5, 0, 0, 1] and values [.2, .4, -, -, .6] give advantages
    [.65, .9, 0, 0, .4] (t=4: 1 - .6; t=1: .5 + .6 - .4 + .5 x .4; t=0:
    .4 - .2 + .5 x .9).

    Returns:
        GAEOutput of float (B, R) tensors (dtype promoted from rewards and
        values), 0 where ``mask`` (or ``action_mask``) is False. ``returns = advantages + values``.
        Rewards and values at masked positions affect nothing. Empty rows give
        all-zero outputs. Gradients flow to the inputs if they require them;
        callers normally pass detached values.
    """
    _check_mask(rewards, mask, "rewards")
    _check_mask(values, mask, "values")
    check_right_padded(mask)
    if action_mask is None:
        action_mask = mask
    else:
        _check_mask(rewards, action_mask, "rewards")
        if bool((action_mask & ~mask).any()):
            raise ValueError("action_mask marks a token outside the response mask: actions must be valid tokens")
    lams = torch.as_tensor(lam, dtype=torch.float64)
    if not 0.0 <= gamma <= 1.0 or not bool(((lams >= 0) & (lams <= 1)).all()):
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")
    if torch.is_tensor(lam):
        if lam.shape != mask.shape[:1]:
            raise ValueError(f"a per-row lam must have shape (B,) = {tuple(mask.shape[:1])}, got {tuple(lam.shape)}")
        lam = lam.to(device=rewards.device, dtype=torch.promote_types(rewards.dtype, values.dtype))

    # Zeroing padding makes V_{t+1} = 0 after the last valid token (terminal
    # state) and makes delta_t = 0 on the padding, so A stays 0 there.
    rewards = _zero_masked(rewards, action_mask)
    values = _zero_masked(values, action_mask)
    num_tokens = mask.shape[1]
    if num_tokens == 0:
        return GAEOutput(advantages=rewards + values, returns=rewards + values)
    zero = torch.zeros_like(values[:, 0] + rewards[:, 0])
    next_value, next_adv = zero, zero
    reversed_adv = []
    # Reverse loop over R only; every step is vectorised over the B rows. A position that is not
    # an action (an observation, or padding after the episode) passes V_{t+1} and A_{t+1} on.
    for t in reversed(range(num_tokens)):
        acts = action_mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        next_adv = torch.where(acts, adv, next_adv)
        next_value = torch.where(acts, values[:, t], next_value)
        reversed_adv.append(adv)
    advantages = _zero_masked(torch.stack(reversed_adv[::-1], dim=1), action_mask)
    returns = _zero_masked(advantages + values, action_mask)
    return GAEOutput(advantages=advantages, returns=returns)


def adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """Length-adaptive GAE lambda per sequence (VAPO, Yue et al. 2025, arXiv:2504.05118, sec. 3.2):
    ``lambda = 1 - 1 / (alpha * length)``, clipped to [0, 1], so the bias-variance trade-off
    follows each response's length (a long response keeps lambda near 1: little bias).

    Args:
        lengths: (B,) response token counts (int or float).
        alpha: > 0; VAPO uses 0.05.

    Returns:
        float (B,) lambdas. E.g. alpha 0.05: length 100 -> 0.8, 1000 -> 0.98, 10 -> 0 (clipped
        from -1).
    """
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    lengths = lengths.to(torch.float32).clamp(min=1.0)
    return (1.0 - 1.0 / (alpha * lengths)).clamp(0.0, 1.0)
