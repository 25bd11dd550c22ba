"""Losses of the two stages before PPO: supervised fine-tuning and the reward model.

``sft_loss``: next-token negative log-likelihood on response tokens only (the prompt is
context, not a target). ``pairwise_loss``: the Bradley-Terry loss of a reward model on
preference pairs, ``-log sigmoid(r_chosen - r_rejected [- margin])`` (Ouyang et al. 2022,
"Training language models to follow instructions with human feedback", arXiv:2203.02155,
eq. 1; the margin term is Llama 2's, Touvron et al. 2023, arXiv:2307.09288, eq. 2), with an
optional centering term ``c * (r_chosen + r_rejected)^2`` (Eisenstein et al. 2023, "Helping or
Herding?", arXiv:2312.09244): the Bradley-Terry loss sees only differences, so a prompt may add
any offset to all its scores; centering pulls each pair's scores around 0, so scores compare
across prompts (what a PPO critic and a batch-normalised reward need).

Normalisation follows ``losses.py``: a sum over the valid tokens (pairs) divided by
``num_tokens`` (``num_pairs``), which trainers set to the count of the whole optimiser step
over all ranks and micro-batches, so the losses of a split batch sum to the full-batch loss.

Vocabulary: B sequences (pairs), T positions, V vocab. Masks are bool, True = counts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .logprobs import logprobs_from_logits
from .losses import token_mean_loss


class SFTLossOutput(NamedTuple):
    """Result of :func:`sft_loss`; metrics are detached 0-dim tensors over the local tokens."""

    loss: torch.Tensor  # 0-dim, differentiable: sum of token NLLs / num_tokens
    nll_mean: torch.Tensor  # mean NLL per local response token (independent of num_tokens)
    token_accuracy: torch.Tensor  # share of local response tokens where argmax(logits) == label


class PairwiseLossOutput(NamedTuple):
    """Result of :func:`pairwise_loss`; ``accuracy`` is detached, over the local pairs."""

    loss: torch.Tensor  # 0-dim, differentiable: sum of pair losses / num_pairs
    accuracy: torch.Tensor  # share of pairs with r_chosen > r_rejected (a tie counts as wrong)


def sft_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    num_tokens: float | torch.Tensor | None = None,
) -> SFTLossOutput:
    """Token-level negative log-likelihood of ``labels`` under ``logits``.

    Args:
        logits: float (B, T, V) logits already aligned with ``labels``: ``logits[:, t]`` is
            the model's prediction for ``labels[:, t]`` (a causal LM's outputs shifted by one,
            ``out.logits[:, :-1]`` against ``input_ids[:, 1:]``).
        labels: integer (B, T) target token ids.
        mask: bool (B, T), True = a response token that is a target. Prompt and padding
            positions are False; their logits and labels change neither loss nor gradient.
        num_tokens: divisor of the summed NLL; None uses the local ``mask.sum()`` (at least
            1). Pass the global target-token count of the optimiser step.

    Returns:
        SFTLossOutput(loss, nll_mean, token_accuracy).
    """
    if mask.shape != labels.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != labels shape {tuple(labels.shape)}")
    # Masked positions may hold any id (e.g. -100 as in HF's convention): read them as 0.
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    nll = -logprobs_from_logits(logits, safe_labels)  # (B, T) float32
    loss = token_mean_loss(nll, mask, num_tokens)
    with torch.no_grad():
        count = mask.sum().clamp(min=1)
        nll_mean = torch.where(mask, nll.detach(), torch.zeros_like(nll)).sum() / count
        hits = (logits.detach().argmax(dim=-1) == safe_labels) & mask
        token_accuracy = hits.sum() / count
    return SFTLossOutput(loss, nll_mean, token_accuracy.float())


def pairwise_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    *,
    num_pairs: float | torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> PairwiseLossOutput:
    """Bradley-Terry loss ``sum_i [-log sigmoid(r_chosen_i - r_rejected_i - margin_i)
    + center_coef * (r_chosen_i + r_rejected_i)^2] / num_pairs``.

    ``-log sigmoid(x)`` is computed as ``softplus(-x)`` (``F.logsigmoid``), exact for large
    |x| where ``log(sigmoid(x))`` underflows to -inf.

    Args:
        r_chosen: float (B,) reward of the preferred response of each pair.
        r_rejected: float (B,) reward of the other response.
        margin: None, a float, or float (B,) margins; the loss then asks for
            ``r_chosen - r_rejected > margin`` (Llama 2). None means 0.
        num_pairs: divisor; None uses B (at least 1). Pass the global pair count of the
            optimiser step.
        center_coef: weight of the centering term (>= 0; 0 leaves it out).

    Returns:
        PairwiseLossOutput(loss, accuracy).
    """
    if r_chosen.dim() != 1 or r_chosen.shape != r_rejected.shape:
        raise ValueError(f"expected r_chosen and r_rejected of shape (B,), got {tuple(r_chosen.shape)} "
                         f"and {tuple(r_rejected.shape)}")
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        margin_t = torch.as_tensor(margin, dtype=diff.dtype, device=diff.device)
        if margin_t.dim() > 0 and margin_t.shape != diff.shape:
            raise ValueError(f"margin shape {tuple(margin_t.shape)} != pairs {tuple(diff.shape)}")
        diff = diff - margin_t
    if num_pairs is None:
        num_pairs = max(diff.numel(), 1)
    elif not isinstance(num_pairs, torch.Tensor) and num_pairs <= 0:
        raise ValueError(f"num_pairs must be > 0, got {num_pairs}")
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    per_pair = -F.logsigmoid(diff)
    if center_coef:
        per_pair = per_pair + center_coef * (r_chosen.float() + r_rejected.float()) ** 2
    loss = per_pair.sum() / num_pairs
    with torch.no_grad():
        accuracy = (r_chosen.detach() > r_rejected.detach()).float().mean() if diff.numel() else diff.new_zeros(())
    return PairwiseLossOutput(loss, accuracy)
