"""Token log-probabilities and entropies from language-model logits.

Both functions compute in float32 whatever the logits dtype: bf16 has 8
mantissa bits, and a log-softmax over a 100k-token vocabulary in bf16 is off by
far more than the PPO ratio tolerates (the rollout engine and the learner must
agree on log pi to ~1e-3 for the ratio to start near 1).

Temperature: the rollout engine samples from softmax(logits / T), so the
learner must score tokens under the same tempered distribution, or the PPO
ratio is not 1 at the first step.
"""

from __future__ import annotations

import torch


def _tempered_float32(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature`` as a new-or-unchanged float32 tensor (never in place)."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    scaled = logits.float()
    if temperature != 1.0:
        scaled = scaled / temperature  # out of place: the caller's logits stay intact
    return scaled


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probability of each given token under ``softmax(logits / temperature)``.

    ``log_softmax(z)[tok] = z[tok] - logsumexp(z)``: we gather the one logit we
    need and subtract the logsumexp, instead of building the full (B, R, V)
    log-softmax and gathering from it. That saves one (B, R, V) float32 output
    (and, under autograd, it is not kept for backward). A float32 copy of bf16
    logits is still made.

    Args:
        logits: float (B, R, V) logits (any float dtype, e.g. bf16); the logits
            that predict ``tokens`` (already shifted by one position).
        tokens: integer (B, R) token ids in [0, V).
        temperature: sampling temperature, > 0.

    Returns:
        float32 (B, R) log pi_T(token). ``logits`` is not modified.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, R, V) and tokens (B, R), got {tuple(logits.shape)} "
            f"and {tuple(tokens.shape)}"
        )
    if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor, got dtype {tokens.dtype}")
    scaled = _tempered_float32(logits, temperature)
    picked = scaled.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of ``softmax(logits / temperature)`` at each position.

    ``H = logsumexp(z) - sum_v p_v z_v`` with ``z`` shifted so its max is 0:
    after the shift both terms are small (0 <= logsumexp <= log V), so the
    subtraction does not cancel large numbers. Logits of -inf (banned tokens)
    contribute 0, not NaN.

    Args:
        logits: float (B, R, V) logits, any float dtype.
        temperature: sampling temperature, > 0.

    Returns:
        float32 (B, R) entropies in nats. ``logits`` is not modified.
    """
    if logits.dim() != 3:
        raise ValueError(f"expected logits (B, R, V), got shape {tuple(logits.shape)}")
    scaled = _tempered_float32(logits, temperature)
    # The shift cancels exactly in H, so detaching it changes no gradient.
    shifted = scaled - scaled.amax(dim=-1, keepdim=True).detach()
    probs = torch.softmax(shifted, dim=-1)
    # p * z is 0 * -inf = NaN for banned tokens; their probability is 0, so
    # replace z by 0 there (also keeps the backward pass NaN-free).
    finite = torch.where(torch.isneginf(shifted), torch.zeros_like(shifted), shifted)
    return torch.logsumexp(shifted, dim=-1) - (probs * finite).sum(dim=-1)


def logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    entropy_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``logprobs_from_logits`` and ``entropy_from_logits`` from one logsumexp.

    With ``log p = z - logsumexp(z)``, ``H = -sum_v p_v log p_v``: the log-softmax is
    bounded above by 0 whatever the logits' scale, so this needs no max-shift, and the
    logsumexp the logprobs need is reused instead of computed twice. Banned tokens
    (``z = -inf``) have ``p = 0`` and contribute 0, not NaN.

    Args:
        logits: float (B, R, V) logits predicting ``tokens``.
        tokens: integer (B, R) token ids in [0, V).
        temperature: sampling temperature, > 0.
        entropy_grad: False computes the entropy from detached logits (for logging only:
            its graph is not built, which saves the (B, R, V) tensors autograd would keep).

    Returns:
        float32 (B, R) log pi_T(token) and float32 (B, R) entropies in nats.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits (B, R, V) and tokens (B, R), got {tuple(logits.shape)} "
            f"and {tuple(tokens.shape)}"
        )
    scaled = _tempered_float32(logits, temperature)
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # (B, R, 1)
    logprobs = (scaled.gather(-1, tokens.long().unsqueeze(-1)) - lse).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        log_p = scaled - lse  # no graph is recorded for it when entropy_grad is False
        # exp(-inf) * -inf would be NaN (and so would its gradient, even behind a where).
        finite = torch.where(torch.isneginf(log_p), torch.zeros_like(log_p), log_p)
        entropy = -(log_p.exp() * finite).sum(dim=-1)
    return logprobs, entropy


def _logprobs_entropy_rows(logits: torch.Tensor, tokens: torch.Tensor, temperature: float,
                           entropy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits, (N,) tokens -> (N,) logprobs and (N,) entropies (zeros when ``entropy`` is
    "none"); the row form of :func:`logprobs_and_entropy`, checkpointed chunk by chunk."""
    if entropy == "none":
        lp = logprobs_from_logits(logits.unsqueeze(0), tokens.unsqueeze(0), temperature)[0]
        return lp, torch.zeros_like(lp)
    lp, ent = logprobs_and_entropy(logits.unsqueeze(0), tokens.unsqueeze(0), temperature,
                                   entropy_grad=entropy == "grad")
    return lp[0], ent[0]


def chunked_logprobs_and_entropy(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    entropy: str = "none",
    chunk: int = 2048,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`logprobs_and_entropy` (or :func:`logprobs_from_logits` when ``entropy`` is "none")
    over ``chunk`` positions at a time, so the float32 working copies of the logits exist for
    one chunk only.

    The float32 log-softmax of bf16 logits is a (B, R, V) float32 tensor, twice the logits'
    own size (8192 positions x a 152k vocabulary: 5 GB), and autograd would keep it for the
    backward pass. Under autograd each chunk runs inside ``torch.utils.checkpoint``: only the
    chunk's slice of the logits (which exist anyway) is saved, and the backward pass
    recomputes the chunk's float32 terms. Values and gradients equal the unchunked ones.

    Args:
        logits: (B, R, V) logits predicting ``tokens``, any float dtype.
        tokens: (B, R) integer token ids.
        temperature: sampling temperature, > 0.
        entropy: "none" (not computed; returns None), "log" (detached) or "grad".
        chunk: positions per chunk (> 0).

    Returns:
        float32 (B, R) logprobs, and float32 (B, R) entropies or None.
    """
    if logits.dim() != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(f"expected logits (B, R, V) and tokens (B, R), got {tuple(logits.shape)} "
                         f"and {tuple(tokens.shape)}")
    if entropy not in ("none", "log", "grad"):
        raise ValueError(f"entropy must be none, log or grad, got {entropy!r}")
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    B, R, V = logits.shape
    if B * R == 0:  # e.g. a packed micro-batch whose samples were all quarantined: empty, still on the graph
        empty = logits.float().sum(-1)
        return empty, (empty.clone() if entropy != "none" else None)
    rows, row_tokens = logits.reshape(B * R, V), tokens.reshape(B * R)
    # One chunk saves nothing by recomputation: run it plainly.
    use_checkpoint = torch.is_grad_enabled() and logits.requires_grad and B * R > chunk
    lps, ents = [], []
    for start in range(0, B * R, chunk):
        args = (rows[start: start + chunk], row_tokens[start: start + chunk], temperature, entropy)
        if use_checkpoint:
            from torch.utils.checkpoint import checkpoint

            lp, ent = checkpoint(_logprobs_entropy_rows, *args, use_reentrant=False)
        else:
            lp, ent = _logprobs_entropy_rows(*args)
        lps.append(lp)
        ents.append(ent)
    logprobs = torch.cat(lps).reshape(B, R)
    return logprobs, (torch.cat(ents).reshape(B, R) if entropy != "none" else None)
