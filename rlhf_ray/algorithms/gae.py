"""Generalized Advantage Estimation over response tokens.

Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized
Advantage Estimation" (arXiv:1506.02438), eq. 16 in its recursive form:

    delta_t = r_t + gamma * V_{t+1} - V_t
    A_t     = delta_t + gamma * lam * A_{t+1}

Each response is one episode; every token is one action. The episode ends after
the last valid token, so the bootstrap value there is 0.
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
    lam: float,
) -> GAEOutput:
    """Per-token GAE advantages and returns for right-padded responses.

    Args:
        rewards: float (B, R) per-token rewards r_t.
        values: float (B, R) critic values V_t of the state before token t.
        mask: bool (B, R), True = real response token; each row must be
            right-padded (a prefix of True then False), else ValueError.
        gamma: discount factor in [0, 1].
        lam: GAE lambda in [0, 1].

    Returns:
        GAEOutput of float (B, R) tensors (dtype promoted from rewards and
        values), 0 where ``mask`` is False. ``returns = advantages + values``.
        Rewards and values at masked positions affect nothing. Empty rows give
        all-zero outputs. Gradients flow to the inputs if they require them;
        callers normally pass detached values.
    """
    _check_mask(rewards, mask, "rewards")
    _check_mask(values, mask, "values")
    check_right_padded(mask)
    if not 0.0 <= gamma <= 1.0 or not 0.0 <= lam <= 1.0:
        raise ValueError(f"gamma and lam must lie in [0, 1], got gamma={gamma}, lam={lam}")

    # Zeroing padding makes V_{t+1} = 0 after the last valid token (terminal
    # state) and makes delta_t = 0 on the padding, so A stays 0 there.
    rewards = _zero_masked(rewards, mask)
    values = _zero_masked(values, mask)
    num_tokens = mask.shape[1]
    if num_tokens == 0:
        return GAEOutput(advantages=rewards + values, returns=rewards + values)
    zero = torch.zeros_like(values[:, 0] + rewards[:, 0])
    next_value, next_adv = zero, zero
    reversed_adv = []
    # Reverse loop over R only; every step is vectorised over the B rows.
    for t in reversed(range(num_tokens)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = delta + gamma * lam * next_adv
        next_value = values[:, t]
        reversed_adv.append(next_adv)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    returns = _zero_masked(advantages + values, mask)
    return GAEOutput(advantages=_zero_masked(advantages, mask), returns=returns)
