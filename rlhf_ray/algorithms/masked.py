"""Reductions over the valid tokens of a padded batch.

Every function here takes a float tensor ``x`` and a bool ``mask`` of the same
shape, where ``mask`` True means "this element counts" (a real response token)
and False means padding. Elements where the mask is False never influence the
result, not even when they hold NaN or inf: we select with ``torch.where``
instead of multiplying by the mask, because ``nan * 0`` is still NaN.

Empty reductions (no valid element) return 0 rather than NaN, so that a batch
with an all-padding row cannot poison a loss or a logged metric. Each function
says so in its docstring.
"""

from __future__ import annotations

import torch

Dim = int | tuple[int, ...] | None


def _check_mask(x: torch.Tensor, mask: torch.Tensor, x_name: str = "x") -> None:
    """Raise ValueError unless ``mask`` is a bool tensor shaped like ``x``."""
    if mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor (True = counts), got dtype {mask.dtype}; "
            "convert with mask.bool()"
        )
    if mask.shape != x.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} does not match {x_name} shape "
            f"{tuple(x.shape)}"
        )


def _count(mask: torch.Tensor, dim: Dim, keepdim: bool = False) -> torch.Tensor:
    """Number of True elements of ``mask`` along ``dim`` (all elements if None)."""
    if dim is None:
        return mask.sum()
    return mask.sum(dim=dim, keepdim=keepdim)


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Copy of ``x`` with 0 where ``mask`` is False.

    Done before any arithmetic so that garbage (inf, NaN) in padding cannot
    reach the result or, through ``0 * inf`` in a backward pass, the gradient.
    """
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _sum(x: torch.Tensor, mask: torch.Tensor, dim: Dim, keepdim: bool) -> torch.Tensor:
    """Sum of ``x`` over valid elements."""
    kept = _zero_masked(x, mask)
    if dim is None:
        return kept.sum()
    return kept.sum(dim=dim, keepdim=keepdim)


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Sum of ``x`` over the elements where ``mask`` is True.

    Args:
        x: float tensor, any shape (typically (B, R)).
        mask: bool tensor, same shape as ``x``; True = counts.
        dim: dimension(s) to reduce; None reduces over all elements to a scalar.

    Returns:
        Tensor of ``x.dtype`` with ``dim`` removed (0-dim if ``dim`` is None).
        An entry with no valid element is 0.
    """
    _check_mask(x, mask)
    return _sum(x, mask, dim, keepdim=False)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim = None) -> torch.Tensor:
    """Mean of ``x`` over the elements where ``mask`` is True.

    Args:
        x: float tensor, any shape (typically (B, R)).
        mask: bool tensor, same shape as ``x``; True = counts.
        dim: dimension(s) to reduce; None averages over all valid elements.

    Returns:
        Tensor of ``x.dtype`` with ``dim`` removed (0-dim if ``dim`` is None).
        An entry with no valid element is 0, not NaN (0 / max(count, 1)).
    """
    _check_mask(x, mask)
    return _mean(x, mask, dim, keepdim=False)


def _mean(x: torch.Tensor, mask: torch.Tensor, dim: Dim, keepdim: bool) -> torch.Tensor:
    count = _count(mask, dim, keepdim).clamp(min=1).to(x.dtype)
    return _sum(x, mask, dim, keepdim) / count


def masked_var(
    x: torch.Tensor, mask: torch.Tensor, dim: Dim = None, unbiased: bool = True
) -> torch.Tensor:
    """Variance of ``x`` over the elements where ``mask`` is True.

    Args:
        x: float tensor, any shape (typically (B, R)).
        mask: bool tensor, same shape as ``x``; True = counts.
        dim: dimension(s) to reduce; None uses all valid elements.
        unbiased: divide by ``n - 1`` (Bessel's correction, like ``torch.var``)
            instead of ``n``.

    Returns:
        Tensor of ``x.dtype`` with ``dim`` removed (0-dim if ``dim`` is None).
        An entry whose valid count is too small to define the variance
        (0 elements, or 1 element when ``unbiased``) is 0, not NaN. We return 0
        rather than raising so that no device-to-host sync is needed.
    """
    _check_mask(x, mask)
    return _var(x, mask, dim, unbiased, keepdim=False)


def _var(
    x: torch.Tensor, mask: torch.Tensor, dim: Dim, unbiased: bool, keepdim: bool
) -> torch.Tensor:
    # Two-pass (centre first, then square) for accuracy; the one-pass
    # E[x^2] - E[x]^2 form cancels catastrophically in float32.
    x = _zero_masked(x, mask)
    mean = _mean(x, mask, dim, keepdim=True)
    sq_dev = (x - mean) ** 2
    count = _count(mask, dim, keepdim).to(x.dtype)
    denom = (count - 1.0) if unbiased else count
    total = _sum(sq_dev, mask, dim, keepdim)
    return torch.where(denom > 0, total / denom.clamp(min=1.0), torch.zeros_like(total))


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: Dim = None,
    shift_mean: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Normalise ``x`` to unit variance (and zero mean) over its valid elements.

    ``(x - mean) / sqrt(var + eps)`` with mean and unbiased variance taken over
    the valid elements along ``dim``. This is the usual advantage
    normalisation of PPO implementations (e.g. OpenAI baselines ppo2).

    Args:
        x: float tensor, any shape (typically (B, R) advantages).
        mask: bool tensor, same shape as ``x``; True = counts.
        dim: dimension(s) the statistics are taken over; None uses all valid
            elements of the batch (one mean and one variance).
        shift_mean: if False, the mean is added back after scaling, so only the
            scale changes and the mean is kept.
        eps: added to the variance before the square root.

    Returns:
        Tensor shaped and typed like ``x``; 0 where ``mask`` is False.
    """
    _check_mask(x, mask)
    x = _zero_masked(x, mask)
    mean = _mean(x, mask, dim, keepdim=True)
    var = _var(x, mask, dim, unbiased=True, keepdim=True)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Fraction of the variance of ``returns`` that ``values`` explains.

    ``1 - Var[returns - values] / Var[returns]`` over all valid tokens, the
    critic diagnostic of OpenAI baselines (``explained_variance``): 1 is a
    perfect critic, 0 is no better than a constant, negative is worse.

    Args:
        values: float (B, R) critic predictions.
        returns: float (B, R) regression targets.
        mask: bool (B, R); True = counts.

    Returns:
        Detached 0-dim tensor (a metric). When ``Var[returns]`` is 0 (including
        fewer than two valid tokens) there is nothing to explain and we return
        0 instead of the NaN / -inf that the formula gives, so logs stay finite.
    """
    _check_mask(values, mask, "values")
    _check_mask(returns, mask, "returns")
    values, returns = values.detach(), returns.detach()
    # Population variance: the two variances share the same denominator, so
    # Bessel's correction would cancel anyway, and n = 1 stays defined.
    var_returns = _var(returns, mask, None, unbiased=False, keepdim=False)
    var_resid = _var(returns - values, mask, None, unbiased=False, keepdim=False)
    ratio = var_resid / var_returns.clamp(min=torch.finfo(var_returns.dtype).tiny)
    return torch.where(var_returns > 0, 1.0 - ratio, torch.zeros_like(ratio))


def masked_correlation(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of ``a`` and ``b`` over the valid positions, a critic diagnostic
    (values against their returns): cov(a, b) / (std(a) std(b)) with population moments.

    Args:
        a, b: float (B, R).
        mask: bool (B, R); True = counts.

    Returns:
        Detached 0-dim tensor in [-1, 1]; 0 when either side is constant over the valid
        positions (or fewer than two are valid), instead of NaN. E.g. a = [1, 2, 3], b = [2, 4, 7]:
        cov 5/3, var 2/3 and 38/9, correlation 5 / sqrt(2 x 114/9) = 0.9934.
    """
    _check_mask(a, mask, "a")
    _check_mask(b, mask, "b")
    a, b = a.detach(), b.detach()
    da = _zero_masked(a - _mean(a, mask, None, False), mask)
    db = _zero_masked(b - _mean(b, mask, None, False), mask)
    cov, va, vb = (da * db).sum(), (da * da).sum(), (db * db).sum()
    denom = (va * vb).sqrt()
    return torch.where(denom > 0, cov / denom.clamp(min=torch.finfo(denom.dtype).tiny), torch.zeros_like(cov))
