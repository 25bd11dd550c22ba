"""Masked reductions: hand examples, a float64 loop reference, invariances."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

X = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
M = torch.tensor([[True, True, False], [True, False, False]])


def _random_batch(seed: int, b: int = 3, r: int = 5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, r, generator=g, dtype=torch.float64)
    lengths = [r, 2, 4][:b]  # right-padded rows of different lengths
    mask = torch.arange(r)[None, :] < torch.tensor(lengths)[:, None]
    mask[1, 3] = True  # and one hole, so nothing assumes right padding
    return x, mask


def _loop_stats(values: list[float], unbiased: bool) -> tuple[float, float, float]:
    n = len(values)
    total = sum(values)
    mean = total / n if n else 0.0
    ddof = 1 if unbiased else 0
    sq = sum((v - mean) ** 2 for v in values)
    var = sq / (n - ddof) if n - ddof > 0 else 0.0
    return total, mean, var


# ---- hand-computed examples -------------------------------------------------


def test_masked_sum_and_mean_hand_example():
    assert masked_sum(X, M).item() == 7.0
    assert masked_sum(X, M, dim=1).tolist() == [3.0, 4.0]
    assert masked_sum(X, M, dim=0).tolist() == [5.0, 2.0, 0.0]
    assert masked_mean(X, M).item() == pytest.approx(7.0 / 3.0)
    assert masked_mean(X, M, dim=1).tolist() == [1.5, 4.0]
    # Column 2 has no valid element: 0, not NaN.
    assert masked_mean(X, M, dim=0).tolist() == [2.5, 2.0, 0.0]


def test_masked_var_hand_example():
    # Valid values 1, 2, 4: mean 7/3, squared deviations sum to 14/3.
    assert masked_var(X, M).item() == pytest.approx(7.0 / 3.0)
    assert masked_var(X, M, unbiased=False).item() == pytest.approx(14.0 / 9.0)
    # Row 1 has a single valid value: unbiased variance undefined -> 0.
    assert masked_var(X, M, dim=1).tolist() == [0.5, 0.0]
    assert masked_var(X, M, dim=1, unbiased=False).tolist() == [0.25, 0.0]


def test_masked_whiten_hand_example():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    # mean 2, unbiased variance 1 -> -1, 0, 1; padding -> 0.
    out = masked_whiten(x, mask, eps=0.0)
    assert out.tolist() == [[-1.0, 0.0, 1.0, 0.0]]
    kept = masked_whiten(x, mask, shift_mean=False, eps=0.0)
    assert kept.tolist() == [[1.0, 2.0, 3.0, 0.0]]
    doubled = masked_whiten(2 * x, mask, shift_mean=False, eps=0.0)
    assert torch.allclose(doubled, torch.tensor([[3.0, 4.0, 5.0, 0.0]]))


def test_explained_variance_hand_example():
    returns = torch.tensor([[0.0, 2.0, 4.0, 6.0, 50.0]])
    values = torch.tensor([[0.0, 2.0, 4.0, 8.0, -9.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    # Residuals 0,0,0,-2: variance 0.75; returns variance 5 -> 1 - 0.15.
    assert explained_variance(values, returns, mask).item() == pytest.approx(0.85)
    assert explained_variance(returns, returns, mask).item() == 1.0
    constant = torch.full_like(returns, 3.0)
    assert explained_variance(constant, returns, mask).item() == pytest.approx(0.0, abs=1e-7)


def test_explained_variance_constant_returns_is_zero_not_nan():
    returns = torch.ones(2, 3)
    values = torch.randn(2, 3)
    mask = torch.ones(2, 3, dtype=torch.bool)
    assert explained_variance(values, returns, mask).item() == 0.0
    one = torch.zeros(2, 3, dtype=torch.bool)
    one[0, 0] = True
    assert explained_variance(values, torch.randn(2, 3), one).item() == 0.0


def test_empty_mask_gives_zero_not_nan():
    empty = torch.zeros(3, 5, dtype=torch.bool)
    x = torch.randn(3, 5)
    for fn in (masked_sum, masked_mean, masked_var):
        assert fn(x, empty).item() == 0.0
        assert fn(x, empty, dim=1).tolist() == [0.0, 0.0, 0.0]
    assert masked_whiten(x, empty).abs().sum().item() == 0.0


# ---- float64 loop reference -------------------------------------------------


@pytest.mark.parametrize("unbiased", [True, False])
def test_reductions_match_loop_reference(unbiased):
    x, mask = _random_batch(0)
    b, r = x.shape
    all_valid = [x[i, j].item() for i in range(b) for j in range(r) if mask[i, j]]
    total, mean, var = _loop_stats(all_valid, unbiased)
    assert masked_sum(x, mask).item() == pytest.approx(total, rel=1e-12)
    assert masked_mean(x, mask).item() == pytest.approx(mean, rel=1e-12)
    assert masked_var(x, mask, unbiased=unbiased).item() == pytest.approx(var, rel=1e-12)
    for dim, n_out in ((1, b), (0, r)):
        sums, means, variances = [], [], []
        for k in range(n_out):
            idx = [(k, j) for j in range(r)] if dim == 1 else [(i, k) for i in range(b)]
            stats = _loop_stats([x[i, j].item() for i, j in idx if mask[i, j]], unbiased)
            sums.append(stats[0])
            means.append(stats[1])
            variances.append(stats[2])
        torch.testing.assert_close(masked_sum(x, mask, dim=dim).tolist(), sums)
        torch.testing.assert_close(masked_mean(x, mask, dim=dim).tolist(), means)
        got = masked_var(x, mask, dim=dim, unbiased=unbiased).tolist()
        torch.testing.assert_close(got, variances)


def test_whiten_matches_loop_reference():
    x, mask = _random_batch(1)
    b, r = x.shape
    valid = [x[i, j].item() for i in range(b) for j in range(r) if mask[i, j]]
    _, mean, var = _loop_stats(valid, unbiased=True)
    scale = math.sqrt(var + 1e-8)
    expected = [
        [(x[i, j].item() - mean) / scale if mask[i, j] else 0.0 for j in range(r)] for i in range(b)
    ]
    torch.testing.assert_close(masked_whiten(x, mask).tolist(), expected)
    # Per-row statistics (dim=1).
    per_row = []
    for i in range(b):
        row = [x[i, j].item() for j in range(r) if mask[i, j]]
        _, m_i, v_i = _loop_stats(row, unbiased=True)
        scale = math.sqrt(v_i + 1e-8)
        per_row.append([(x[i, j].item() - m_i) / scale if mask[i, j] else 0.0 for j in range(r)])
    torch.testing.assert_close(masked_whiten(x, mask, dim=1).tolist(), per_row)


def test_explained_variance_matches_loop_reference():
    returns, mask = _random_batch(2)
    noise, _ = _random_batch(3)
    values = returns + 0.3 * noise
    b, r = returns.shape
    valid = [(i, j) for i in range(b) for j in range(r) if mask[i, j]]
    ys = [returns[i, j].item() for i, j in valid]
    res = [returns[i, j].item() - values[i, j].item() for i, j in valid]
    expected = 1.0 - _loop_stats(res, False)[2] / _loop_stats(ys, False)[2]
    got = explained_variance(values, returns, mask)
    assert got.item() == pytest.approx(expected, rel=1e-12)
    assert 0.5 < expected < 1.0  # the example is not degenerate


# ---- invariances ------------------------------------------------------------


def test_masked_positions_change_nothing_even_nan_and_inf():
    x, mask = _random_batch(4)
    junk = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], dtype=x.dtype)
    garbage = torch.where(mask, x, junk.repeat(4)[: x.numel()].view_as(x))
    assert not torch.isfinite(garbage).all()
    for dim in (None, 0, 1):
        assert torch.equal(masked_sum(x, mask, dim), masked_sum(garbage, mask, dim))
        assert torch.equal(masked_mean(x, mask, dim), masked_mean(garbage, mask, dim))
        assert torch.equal(masked_var(x, mask, dim), masked_var(garbage, mask, dim))
        assert torch.equal(masked_whiten(x, mask, dim), masked_whiten(garbage, mask, dim))
    target = x * 0.5
    assert torch.equal(
        explained_variance(x, target, mask), explained_variance(garbage, target, mask)
    )


def test_gradients_stay_finite_with_garbage_in_padding():
    x, mask = _random_batch(5)
    x = x.clone()
    x[~mask] = float("inf")
    x.requires_grad_(True)
    loss = masked_var(x, mask) + masked_whiten(x, mask, dim=1).square().sum() + masked_mean(x, mask)
    loss.backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad[~mask] == 0).all()
    assert (x.grad[mask] != 0).any()


def test_inputs_not_mutated_and_metric_detached():
    x, mask = _random_batch(6)
    x_before, mask_before = x.clone(), mask.clone()
    for fn in (masked_sum, masked_mean, masked_var, masked_whiten):
        fn(x, mask)
    assert torch.equal(x, x_before) and torch.equal(mask, mask_before)
    values = x.clone().requires_grad_(True)
    assert not explained_variance(values, x, mask).requires_grad


def test_bad_masks_raise():
    with pytest.raises(ValueError, match="bool"):
        masked_sum(X, M.float())
    with pytest.raises(ValueError, match="shape"):
        masked_mean(X, M.T)


def test_masked_correlation_hand_example_and_degenerate_cases():
    from rlhf_ray.algorithms import masked_correlation

    a = torch.tensor([[1.0, 2.0, 9.0], [3.0, 0.0, 0.0]])
    b = torch.tensor([[2.0, 4.0, -5.0], [7.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])  # valid: a = 1, 2, 3; b = 2, 4, 7
    assert float(masked_correlation(a, b, mask)) == pytest.approx(5 / math.sqrt(2 * 114 / 9))
    assert float(masked_correlation(a, -b, mask)) == pytest.approx(-5 / math.sqrt(2 * 114 / 9))
    assert float(masked_correlation(torch.ones(2, 3), b, mask)) == 0.0  # constant side: 0, not NaN
    one = torch.tensor([[True, False, False], [False, False, False]])
    assert float(masked_correlation(a, b, one)) == 0.0
