"""DAPO's soft overlong punishment: a length penalty added to the outcome score.

Yu et al. 2025, "DAPO: An Open-Source LLM Reinforcement Learning System at
Scale" (arXiv:2503.14476, sec. 3.4). With generation budget L_max
and a buffer of L_cache tokens before it, a response of length |y| gets

    0                                   |y| <= L_max - L_cache
    ((L_max - L_cache) - |y|) / L_cache L_max - L_cache < |y| <= L_max
    -1                                  L_max < |y|

times ``penalty``: a ramp from 0 down to -penalty over the buffer, so that a
truncated response is punished without the cliff of a hard length cut.
"""

from __future__ import annotations

import torch


def overlong_penalty(
    lengths: torch.Tensor, max_new_tokens: int, buffer: int, penalty: float
) -> torch.Tensor:
    """Per-sample soft overlong punishment, to add to the scores.

    ``-penalty * clamp((length - (max_new_tokens - buffer)) / buffer, 0, 1)``.

    Args:
        lengths: integer or float (B,) response lengths in tokens.
        max_new_tokens: the generation budget L_max, >= 1.
        buffer: the ramp length L_cache, in [1, max_new_tokens].
        penalty: the punishment at and beyond L_max, >= 0 (DAPO uses 1).

    Returns:
        Float (B,) values in [-penalty, 0] (dtype of ``lengths``, at least float32).
    """
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D (B,), got shape {tuple(lengths.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 1 <= buffer <= max_new_tokens:
        raise ValueError(
            f"overlong buffer must lie in [1, max_new_tokens={max_new_tokens}], got {buffer}"
        )
    if penalty < 0:
        raise ValueError(f"overlong penalty must be >= 0 (it is subtracted), got {penalty}")
    dtype = torch.promote_types(lengths.dtype, torch.float32)
    start = max_new_tokens - buffer
    ramp = ((lengths.to(dtype) - start) / buffer).clamp(0.0, 1.0)
    return -penalty * ramp
