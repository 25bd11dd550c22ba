"""Reward shaping: from one scalar score per response to per-token rewards.

The RLHF reward of Ziegler et al. 2019 (arXiv:1909.08593, sec. 2.2) and
Ouyang et al. 2022 (InstructGPT, arXiv:2203.02155, eq. 2) is
``R(x, y) = score(x, y) - beta * KL``. Per token, as in the OpenAI
lm-human-preferences code and most PPO-RLHF systems since, the KL penalty is
paid at every token and the score arrives at the last token.

The score post-processing helpers (missing-EOS penalty, clipping, running
normalisation) are the usual knobs of TRL / OpenRLHF, written as pure
functions of tensors.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .masked import _check_mask, _zero_masked


def _check_scores(scores: torch.Tensor) -> None:
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D (B,), got shape {tuple(scores.shape)}")


def shape_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> torch.Tensor:
    """Per-token rewards: KL penalty on every valid token, score on the last one.

    ``rewards[b, t] = -kl_coef * kl[b, t]`` for valid t, plus ``scores[b]`` at
    the last valid token of row b.

    Args:
        scores: float (B,) reward-model score per response.
        kl: float (B, R) per-token KL estimate (see :func:`kl_estimate`).
        mask: bool (B, R), True = real response token. The score goes to the
            last True position of each row; every row needs at least one True
            (ValueError otherwise: an empty response has nowhere to put it).
        kl_coef: KL penalty coefficient beta (a float, e.g. ``controller.value``).

    Returns:
        Float (B, R) rewards, dtype promoted from ``scores`` and ``kl``;
        0 where ``mask`` is False (KL values at masked positions are ignored).
    """
    _check_scores(scores)
    _check_mask(kl, mask, "kl")
    if scores.shape[0] != kl.shape[0]:
        raise ValueError(f"scores has {scores.shape[0]} rows but kl has {kl.shape[0]}")
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"rows {rows[:8]} have no valid response token, so their score has no "
            "token to land on; drop empty responses before shaping rewards"
        )
    dtype = torch.promote_types(scores.dtype, kl.dtype)
    penalty = -kl_coef * _zero_masked(kl, mask).to(dtype)
    # Index of the last True per row; works for any mask, not only right-padded.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, -1).amax(dim=1, keepdim=True)
    # Out-of-place scatter_add: the caller's tensors are never written to.
    return penalty.scatter_add(1, last, scores.to(dtype).unsqueeze(1))


def apply_missing_eos_penalty(
    scores: torch.Tensor, truncated: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """Subtract ``penalty`` from the scores of responses cut off before EOS.

    Args:
        scores: float (B,) scores.
        truncated: bool (B,), True = the response hit the length limit without
            an end-of-sequence token (True = penalise).
        penalty: amount subtracted (usually > 0); None returns an unchanged copy.

    Returns:
        New float (B,) tensor, same dtype as ``scores``.
    """
    _check_scores(scores)
    _check_mask(scores, truncated, "scores")
    if penalty is None:
        return scores.clone()
    return torch.where(truncated, scores - penalty, scores)


def clip_scores(scores: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Clamp scores to ``[-limit, limit]``; None returns an unchanged copy.

    Args:
        scores: float tensor, any shape (typically (B,)).
        limit: positive bound, or None.

    Returns:
        New tensor shaped and typed like ``scores``.
    """
    if limit is None:
        return scores.clone()
    if limit <= 0:
        raise ValueError(f"score clip limit must be > 0 (or None to disable), got {limit}")
    return scores.clamp(-limit, limit)


def normalize_scores(
    scores: torch.Tensor,
    mean: float | torch.Tensor,
    std: float | torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """``(scores - mean) / (std + eps)``; float tensor in, same shape and dtype out.

    Typically ``mean`` and ``std`` come from a :class:`RunningMoments`.
    """
    return (scores - mean) / (std + eps)


class RunningMoments:
    """Running mean and standard deviation of every score seen so far.

    Batches are merged with the parallel update of Chan, Golub and LeVeque
    (1979, "Updating Formulae and a Pairwise Algorithm for Computing Sample
    Variances"): for counts n_a, n_b, means m_a, m_b and sums of squared
    deviations M_a, M_b,

        delta = m_b - m_a,   n = n_a + n_b
        m = m_a + delta * n_b / n
        M = M_a + M_b + delta^2 * n_a * n_b / n

    State is three Python numbers (float64), so ``state_dict`` is plain and
    device-independent. ``update`` reads its batch back to the host once.
    """

    def __init__(self) -> None:
        self._count = 0
        self._mean = 0.0
        self._m2 = 0.0  # sum of squared deviations from the running mean

    def update(self, x: torch.Tensor) -> None:
        """Fold every element of the float tensor ``x`` (any shape) into the moments."""
        batch = x.detach().to(device="cpu", dtype=torch.float64).flatten()
        n_b = batch.numel()
        if n_b == 0:
            return
        mean_b = batch.mean().item()
        m2_b = (batch - mean_b).square().sum().item()
        n_a = self._count
        n = n_a + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / n
        self._m2 += m2_b + delta * delta * n_a * n_b / n
        self._count = n

    @property
    def count(self) -> int:
        """Number of scores seen."""
        return self._count

    @property
    def mean(self) -> float:
        """Mean of all scores seen (0.0 before any)."""
        return self._mean

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1 denominator, like ``torch.std``).

        0.0 while fewer than two scores have been seen.
        """
        if self._count < 2:
            return 0.0
        return math.sqrt(self._m2 / (self._count - 1))

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python checkpoint state."""
        return {"count": self._count, "mean": self._mean, "m2": self._m2}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict`."""
        self._count = int(state["count"])
        self._mean = float(state["mean"])
        self._m2 = float(state["m2"])
