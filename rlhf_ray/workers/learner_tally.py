"""What a learner rank adds up over a run of epochs (``Learner._epochs``): per-token stat sums,
token counts and optimiser-step outcomes, turned into that run's metrics with one host sync.
A PPO update has one run (its ppo.epochs) and, with ppo.critic_epochs, a second, value-only one
whose metrics the learner reports under ``critic_epochs/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EpochTally:
    """One run of epochs on a rank: per-token stat sums (device tensors, weighted by each
    micro-batch's response tokens) and the step outcomes."""

    value_only: bool  # value-only steps: no policy stats, and a grad norm only where a body stepped
    has_head: bool
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: float = 0.0  # response tokens
    pass_tokens: int = 0  # tokens through the body (padding included)
    real_tokens: int = 0
    grad_norms: list = field(default_factory=list)
    head_norms: list = field(default_factory=list)
    first_dev: torch.Tensor | None = None
    skipped_steps: int = 0
    nonfinite_steps: int = 0

    def add(self, stats: dict[str, torch.Tensor], n_tok: float) -> None:
        """One micro-batch's detached per-token means (its ``ratio_dev_max`` kept if it is the first),
        weighted by its ``n_tok`` response tokens."""
        dev = stats.pop("ratio_dev_max", None)
        self.first_dev = dev if self.first_dev is None else self.first_dev
        for k, v in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n_tok
        self.tokens += n_tok

    def add_passes(self, other: "EpochTally") -> None:
        """``other``'s tokens through the body, counted here too (the update's padding fraction)."""
        self.pass_tokens += other.pass_tokens
        self.real_tokens += other.real_tokens

    def metrics(self) -> dict[str, float]:
        """Per-token means, the mean gradient norms (the engine's only where it stepped in a value-only
        run) and the step counts; no policy metric (``onpolicy_ratio_dev``) for a value-only run."""
        keys = list(self.sums)
        values = torch.stack([self.sums[k].float() for k in keys]).cpu().tolist() if keys else []  # the one sync
        out = {k: v / max(self.tokens, 1.0) for k, v in zip(keys, values)}
        norms = [float(n) for n in self.grad_norms]
        if norms or not self.value_only:
            out["grad_norm"] = sum(norms) / len(norms) if norms else float("nan")
        if self.has_head:
            heads = self.head_norms
            out["value_head_grad_norm"] = float(torch.stack(heads).mean()) if heads else float("nan")
        if not self.value_only:
            out["onpolicy_ratio_dev"] = float(self.first_dev) if self.first_dev is not None else float("nan")
        out["skipped_steps"] = float(self.skipped_steps)
        out["nonfinite_steps"] = float(self.nonfinite_steps)  # optimiser steps skipped for a non-finite gradient
        return out
