"""KL penalty: per-token estimators and the coefficient controllers.

Estimators follow John Schulman, "Approximating KL Divergence" (2020,
http://joschu.net/blog/kl-approx.html). With samples x ~ pi and
``log_ratio = log pi_ref(x) - log pi(x)``:

    k1 = -log_ratio                        unbiased, high variance, can be < 0
    k2 = 0.5 * log_ratio ** 2              biased, low variance, >= 0
    k3 = exp(log_ratio) - log_ratio - 1    unbiased, low variance, >= 0

Controllers follow Ziegler et al. 2019, "Fine-Tuning Language Models from
Human Preferences" (arXiv:1909.08593, sec. 2.2).
"""

from __future__ import annotations

from typing import Any

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token sample estimate of KL(pi || pi_ref), tokens sampled from pi.

    Args:
        logprobs: float (B, R) log pi(token) of the sampled tokens.
        ref_logprobs: float (B, R) log pi_ref(token) of the same tokens.
        estimator: "k1", "k2" or "k3" (see the module docstring).

    Returns:
        Float (B, R) tensor, dtype promoted from the inputs. No mask is
        applied: padded positions hold whatever the inputs give, so callers
        mask (e.g. :func:`shape_token_rewards` or :func:`masked_mean`).
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(
            f"unknown KL estimator {estimator!r}; valid ones are {', '.join(KL_ESTIMATORS)}"
        )
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(
            f"logprobs shape {tuple(logprobs.shape)} != ref_logprobs shape "
            f"{tuple(ref_logprobs.shape)}"
        )
    log_ratio = ref_logprobs - logprobs  # log q/p in Schulman's notation
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio.square()
    # k3: expm1 keeps precision when the policies are close (log_ratio ~ 0).
    return torch.expm1(log_ratio) - log_ratio


class FixedKLController:
    """Constant KL coefficient; same interface as :class:`AdaptiveKLController`."""

    def __init__(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {value}")
        self.value = float(value)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op: the coefficient stays fixed."""

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python checkpoint state: ``{"value": float}``."""
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient saved by :meth:`state_dict`."""
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional controller that steers the observed KL towards ``target``.

    Ziegler et al. 2019 (arXiv:1909.08593, sec. 2.2)::

        err    = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + err * n_steps / horizon

    ``n_steps`` is the number of samples (episodes) the KL was measured on, so
    ``horizon`` is in the same unit: roughly how many samples it takes to move
    the coefficient by e^0.2.

    Args:
        init_value: starting coefficient, > 0 (a zero coefficient could never grow).
        target: desired KL per sample, > 0.
        horizon: controller time constant in samples, > 0.
    """

    def __init__(self, init_value: float, target: float, horizon: int) -> None:
        if init_value <= 0:
            raise ValueError(f"init_value must be > 0 (0 can never grow), got {init_value}")
        if target <= 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_value)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move ``value`` by one controller step.

        Args:
            current_kl: KL measured on the last batch (Python float; pass a
                synced number, this is the logging boundary).
            n_steps: number of samples that batch contained, >= 0.
        """
        if n_steps < 0:
            raise ValueError(f"n_steps must be >= 0, got {n_steps}")
        err = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        """Plain-Python checkpoint state: ``{"value": float}``.

        ``target`` and ``horizon`` come from the config on resume, so a run may
        be resumed with a new target on purpose.
        """
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the coefficient saved by :meth:`state_dict`."""
        self.value = float(state["value"])
