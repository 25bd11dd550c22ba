"""GAE: hand examples, a float64 loop reference, invariances."""

import pytest
import torch

from rlhf_ray.algorithms import GAEOutput, compute_gae


def _right_padded(lengths: list[int], r: int) -> torch.Tensor:
    return torch.arange(r)[None, :] < torch.tensor(lengths)[:, None]


def _loop_gae(rewards, values, lengths, gamma, lam):
    """Textbook reverse recursion on Python floats, one row at a time."""
    advantages, returns = [], []
    for row_r, row_v, n in zip(rewards.tolist(), values.tolist(), lengths):
        r = len(row_r)
        adv = [0.0] * r
        running = 0.0
        for t in reversed(range(n)):
            next_value = row_v[t + 1] if t + 1 < n else 0.0  # terminal after the last token
            delta = row_r[t] + gamma * next_value - row_v[t]
            running = delta + gamma * lam * running
            adv[t] = running
        advantages.append(adv)
        returns.append([adv[t] + row_v[t] if t < n else 0.0 for t in range(r)])
    return advantages, returns


# ---- hand-computed examples -------------------------------------------------


def test_hand_example_from_style_guide():
    out = compute_gae(
        torch.tensor([[0.0, 0.0, 1.0]]),
        torch.tensor([[0.5, 0.5, 0.5]]),
        torch.tensor([[True, True, True]]),
        gamma=1.0,
        lam=0.5,
    )
    assert isinstance(out, GAEOutput)
    assert out.advantages.tolist() == [[0.125, 0.25, 0.5]]
    assert out.returns.tolist() == [[0.625, 0.75, 1.0]]


def test_hand_example_with_padding_and_discount():
    # Row 0 (2 valid tokens): t=1: delta = 2 + 0 - 1 = 1, A = 1.
    #                         t=0: delta = 1 + 0.9*1 - 0.5 = 1.4, A = 1.4 + 0.72*1 = 2.12.
    # Row 1 (1 valid token):  t=0: delta = A = 3 - 2 = 1.
    rewards = torch.tensor([[1.0, 2.0, 7.0], [3.0, 5.0, 5.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 9.0], [2.0, 4.0, 4.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    out = compute_gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(
        out.advantages, torch.tensor([[2.12, 1.0, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        out.returns, torch.tensor([[2.62, 2.0, 0.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    )


# ---- float64 loop reference -------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(0.9, 0.8), (1.0, 0.95), (0.99, 0.0), (0.5, 1.0)])
def test_matches_loop_reference(gamma, lam):
    g = torch.Generator().manual_seed(0)
    b, r = 3, 5
    lengths = [5, 2, 0]  # full, partial and empty rows
    rewards = torch.randn(b, r, generator=g, dtype=torch.float64)
    values = torch.randn(b, r, generator=g, dtype=torch.float64)
    out = compute_gae(rewards, values, _right_padded(lengths, r), gamma, lam)
    adv, ret = _loop_gae(rewards, values, lengths, gamma, lam)
    torch.testing.assert_close(out.advantages.tolist(), adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.returns.tolist(), ret, rtol=1e-12, atol=1e-12)
    assert out.advantages.dtype == torch.float64


def test_lambda_limits():
    g = torch.Generator().manual_seed(1)
    rewards = torch.randn(3, 5, generator=g, dtype=torch.float64)
    values = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = _right_padded([5, 3, 1], 5)
    gamma = 0.9
    # lam = 1: returns are the discounted reward-to-go, whatever the values.
    mc = compute_gae(rewards, values, mask, gamma, 1.0).returns
    expected = torch.zeros_like(rewards)
    for i, n in enumerate([5, 3, 1]):
        for t in range(n):
            expected[i, t] = sum(gamma ** (k - t) * rewards[i, k].item() for k in range(t, n))
    torch.testing.assert_close(mc, expected)
    # lam = 0: advantages are the one-step TD errors, next value 0 at the end.
    td = compute_gae(rewards, values, mask, gamma, 0.0).advantages
    next_values = torch.zeros_like(values)
    next_values[:, :-1] = torch.where(mask[:, 1:], values[:, 1:], 0.0)
    torch.testing.assert_close(td, torch.where(mask, rewards + gamma * next_values - values, 0.0))


# ---- invariances ------------------------------------------------------------


def test_masked_rewards_and_values_change_nothing():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(3, 5, generator=g)
    values = torch.randn(3, 5, generator=g)
    mask = _right_padded([4, 1, 3], 5)
    clean = compute_gae(rewards, values, mask, 0.95, 0.9)
    junk = torch.tensor(float("nan"))
    noisy = compute_gae(
        torch.where(mask, rewards, junk), torch.where(mask, values, 1e6), mask, 0.95, 0.9
    )
    assert torch.equal(clean.advantages, noisy.advantages)
    assert torch.equal(clean.returns, noisy.returns)
    assert (clean.advantages[~mask] == 0).all() and (clean.returns[~mask] == 0).all()
    torch.testing.assert_close(clean.returns[mask], (clean.advantages + values)[mask])


def test_rows_are_independent_and_inputs_not_mutated():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(3, 5, generator=g)
    values = torch.randn(3, 5, generator=g)
    mask = _right_padded([5, 2, 3], 5)
    before = (rewards.clone(), values.clone(), mask.clone())
    batched = compute_gae(rewards, values, mask, 0.9, 0.8)
    for i in range(3):
        row = compute_gae(rewards[i : i + 1], values[i : i + 1], mask[i : i + 1], 0.9, 0.8)
        torch.testing.assert_close(row.advantages[0], batched.advantages[i])
    assert all(torch.equal(a, b) for a, b in zip(before, (rewards, values, mask)))


def test_rejects_masks_that_are_not_right_padded():
    rewards = torch.zeros(2, 4)
    left_padded = torch.tensor([[False, True, True, True], [True, True, True, True]])
    with pytest.raises(ValueError, match=r"right-padded.*rows \[0\]"):
        compute_gae(rewards, rewards, left_padded, 1.0, 1.0)
    holes = torch.tensor([[True, True, True, True], [True, False, True, False]])
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        compute_gae(rewards, rewards, holes, 1.0, 1.0)
    with pytest.raises(ValueError, match="gamma"):
        compute_gae(rewards, rewards, torch.ones(2, 4, dtype=torch.bool), 1.5, 1.0)
    with pytest.raises(ValueError, match="bool"):
        compute_gae(rewards, rewards, torch.ones(2, 4), 1.0, 1.0)


# ---- multi-turn episodes: observation tokens are skipped ---------------------


def test_hand_example_with_observation_tokens():
    # action, action, obs, obs, action; the turn's reward on its last action; gamma 1, lam .5
    mask = torch.tensor([[True] * 5])
    acts = torch.tensor([[True, True, False, False, True]])
    rewards = torch.tensor([[0.0, 0.5, 0.0, 0.0, 1.0]])
    values = torch.tensor([[0.2, 0.4, 9.0, 9.0, 0.6]])  # values at observations are never read
    out = compute_gae(rewards, values, mask, gamma=1.0, lam=0.5, action_mask=acts)
    torch.testing.assert_close(out.advantages, torch.tensor([[0.65, 0.9, 0.0, 0.0, 0.4]]))
    torch.testing.assert_close(out.returns, torch.tensor([[0.85, 1.3, 0.0, 0.0, 1.0]]))


def _loop_multi_turn(rewards, values, acts, gamma, lam):
    """The recursion over each row's action tokens alone (observations removed), on floats."""
    out = []
    for row_r, row_v, row_a in zip(rewards.tolist(), values.tolist(), acts.tolist()):
        idx = [t for t, a in enumerate(row_a) if a]
        adv = [0.0] * len(row_r)
        running, next_value = 0.0, 0.0
        for t in reversed(idx):
            running = row_r[t] + gamma * next_value - row_v[t] + gamma * lam * running
            next_value = row_v[t]
            adv[t] = running
        out.append(adv)
    return out


@pytest.mark.parametrize("gamma,lam", [(1.0, 1.0), (0.9, 0.8), (0.5, 0.0)])
def test_multi_turn_matches_the_recursion_over_actions_only(gamma, lam):
    g = torch.Generator().manual_seed(3)
    B, R, lengths = 3, 7, [7, 5, 2]  # B != R
    mask = _right_padded(lengths, R)
    acts = mask & (torch.rand(B, R, generator=g) < 0.6)
    acts[:, 0] = True
    rewards = torch.randn(B, R, generator=g, dtype=torch.float64)
    values = torch.randn(B, R, generator=g, dtype=torch.float64)
    out = compute_gae(rewards, values, mask, gamma, lam, action_mask=acts)
    torch.testing.assert_close(out.advantages, torch.tensor(_loop_multi_turn(rewards, values, acts, gamma, lam),
                                                            dtype=torch.float64))
    assert bool((out.returns[~acts] == 0).all())


def test_one_turn_episodes_give_the_single_turn_numbers_exactly():
    g = torch.Generator().manual_seed(4)
    mask = _right_padded([5, 3, 1], 5)
    rewards, values = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    plain = compute_gae(rewards, values, mask, 0.95, 0.9)
    every_token_acts = compute_gae(rewards, values, mask, 0.95, 0.9, action_mask=mask.clone())
    assert torch.equal(plain.advantages, every_token_acts.advantages)
    assert torch.equal(plain.returns, every_token_acts.returns)


def test_observation_rewards_and_values_change_nothing_and_actions_stay_inside_the_mask():
    mask = _right_padded([4, 4], 4)
    acts = torch.tensor([[True, False, True, True], [True, True, False, True]])
    rewards, values = torch.ones(2, 4), torch.full((2, 4), 0.5)
    clean = compute_gae(rewards * acts, values * acts, mask, 0.9, 0.8, action_mask=acts)
    noisy = compute_gae(rewards + 7 * ~acts, values - 3 * ~acts, mask, 0.9, 0.8, action_mask=acts)
    assert torch.equal(clean.advantages, noisy.advantages) and torch.equal(clean.returns, noisy.returns)
    with pytest.raises(ValueError, match="outside the response mask"):
        compute_gae(rewards, values, _right_padded([2, 4], 4), 0.9, 0.8, action_mask=acts)


# ---- per-row and length-adaptive lambda (VAPO) --------------------------------


def test_adaptive_lambda_hand_values():
    from rlhf_ray.algorithms import adaptive_lambda

    got = adaptive_lambda(torch.tensor([100, 1000, 10, 20]), 0.05)
    torch.testing.assert_close(got, torch.tensor([0.8, 0.98, 0.0, 0.0]))  # 1 - 1/(0.05 x 10) = -1 -> 0
    with pytest.raises(ValueError, match="alpha must be > 0"):
        adaptive_lambda(torch.tensor([5]), 0.0)


def test_a_per_row_lambda_is_each_rows_own_gae():
    g = torch.Generator().manual_seed(5)
    mask = _right_padded([4, 3, 2], 4)
    rewards, values = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    lams = torch.tensor([0.0, 0.5, 1.0])
    out = compute_gae(rewards, values, mask, 0.9, lams)
    for i, lam in enumerate(lams.tolist()):
        row = compute_gae(rewards[i:i + 1], values[i:i + 1], mask[i:i + 1], 0.9, lam)
        torch.testing.assert_close(out.advantages[i:i + 1], row.advantages)
    with pytest.raises(ValueError, match="shape"):
        compute_gae(rewards, values, mask, 0.9, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="must lie in"):
        compute_gae(rewards, values, mask, 0.9, torch.tensor([0.5, 1.5, 0.5]))
