"""Scalar value head for the critic: one float32 linear layer on top of hidden states.

Shapes: B sequences, T tokens, H hidden size.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class ValueHead(nn.Module):
    """Maps hidden states (B, T, H) to values (B, T), always computing in float32.

    The head is a single ``nn.Linear(H, 1)`` without dropout. Its weight starts at
    N(0, init_std) (exact zeros when ``init_std == 0``, so the first values are 0 and
    the first value loss only moves the head), its bias at 0.

    The parameters stay float32 whatever the body's dtype: ``.to(torch.bfloat16)``,
    ``.half()`` and friends cast the rest of a model but leave this module float32
    (device moves still apply). A value head in bf16 would quantise returns of
    order 1 to ~3 significant digits, which is coarse next to typical value errors.
    """

    def __init__(self, hidden_size: int, init_std: float = 0.0) -> None:
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"hidden_size must be positive, got {hidden_size}")
        if init_std < 0:
            raise ValueError(f"init_std must be >= 0, got {init_std}")
        self.hidden_size = hidden_size
        self.init_std = init_std
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Weight ~ N(0, init_std) (zeros if init_std is 0), bias = 0."""
        with torch.no_grad():
            if self.init_std > 0:
                self.linear.weight.normal_(0.0, self.init_std)
            else:
                self.linear.weight.zero_()
            self.linear.bias.zero_()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True):
        # Module.to / .half / .bfloat16 all funnel through _apply: re-cast floating
        # results to float32 so a dtype change of the whole model skips this head.
        def keep_float32(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            return out.float() if out.is_floating_point() else out

        return super()._apply(keep_float32, recurse)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, T, H) any float dtype -> values (B, T) float32."""
        if hidden.shape[-1] != self.hidden_size:
            raise ValueError(
                f"ValueHead expects last dim {self.hidden_size}, got shape {tuple(hidden.shape)}"
            )
        # .float() is a no-op on float32 tensors; it guards against an engine that
        # rewrote the parameters' storage in a lower precision behind our back.
        weight = self.linear.weight.float()
        bias = self.linear.bias.float()
        return F.linear(hidden.float(), weight, bias).squeeze(-1)
