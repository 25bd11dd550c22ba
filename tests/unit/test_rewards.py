"""Reward shaping and score post-processing."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    RunningMoments,
    apply_missing_eos_penalty,
    clip_scores,
    normalize_scores,
    shape_token_rewards,
)


def _random_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, generator=g, dtype=torch.float64)
    kl = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = torch.arange(5)[None, :] < torch.tensor([5, 1, 3])[:, None]
    return scores, kl, mask


# ---- shape_token_rewards ------------------------------------------------------


def test_shape_token_rewards_hand_example():
    scores = torch.tensor([1.0, -2.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = shape_token_rewards(scores, kl, mask, kl_coef=0.5)
    expected = torch.tensor([[-0.05, -0.1 + 1.0, 0.0], [-0.2, -0.25, -0.3 - 2.0]])
    torch.testing.assert_close(out, expected)


def test_shape_token_rewards_matches_loop_reference():
    scores, kl, mask = _random_inputs(0)
    coef = 0.07
    expected = []
    for i in range(3):
        last = max(j for j in range(5) if mask[i, j])
        row = []
        for j in range(5):
            value = -coef * kl[i, j].item() if mask[i, j] else 0.0
            row.append(value + (scores[i].item() if j == last else 0.0))
        expected.append(row)
    out = shape_token_rewards(scores, kl, mask, coef)
    torch.testing.assert_close(out.tolist(), expected, rtol=1e-12, atol=1e-12)
    assert out.dtype == torch.float64


def test_shape_token_rewards_invariances():
    scores, kl, mask = _random_inputs(1)
    before = (scores.clone(), kl.clone(), mask.clone())
    clean = shape_token_rewards(scores, kl, mask, 0.1)
    noisy = shape_token_rewards(scores, torch.where(mask, kl, float("nan")), mask, 0.1)
    assert torch.equal(clean, noisy)
    assert (clean[~mask] == 0).all()
    # Total reward per row = score - coef * total KL.
    torch.testing.assert_close(
        clean.sum(1), scores - 0.1 * torch.where(mask, kl, 0.0).sum(1)
    )
    assert all(torch.equal(a, b) for a, b in zip(before, (scores, kl, mask)))
    # With a hole in the mask the score still lands on the last True.
    holed = torch.tensor([[True, False, True, False, False]] * 3)
    out = shape_token_rewards(scores, torch.zeros(3, 5, dtype=torch.float64), holed, 0.1)
    torch.testing.assert_close(out[:, 2], scores)


def test_shape_token_rewards_rejects_empty_rows():
    scores, kl, mask = _random_inputs(2)
    mask = mask.clone()
    mask[1] = False
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        shape_token_rewards(scores, kl, mask, 0.1)
    with pytest.raises(ValueError, match="1-D"):
        shape_token_rewards(scores[:, None], kl, mask, 0.1)


# ---- missing EOS penalty and clipping ------------------------------------------


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0, 3.0])
    truncated = torch.tensor([False, True, True])
    assert apply_missing_eos_penalty(scores, truncated, 1.5).tolist() == [1.0, 0.5, 1.5]
    copy = apply_missing_eos_penalty(scores, truncated, None)
    assert copy.tolist() == [1.0, 2.0, 3.0]
    copy[0] = 9.0
    assert scores.tolist() == [1.0, 2.0, 3.0]  # a copy, not an alias
    with pytest.raises(ValueError, match="bool"):
        apply_missing_eos_penalty(scores, truncated.float(), 1.0)


def test_missing_eos_penalty_matches_loop_reference():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(6, generator=g, dtype=torch.float64)
    truncated = torch.rand(6, generator=g) < 0.5
    expected = [s - 0.7 if t else s for s, t in zip(scores.tolist(), truncated.tolist())]
    assert apply_missing_eos_penalty(scores, truncated, 0.7).tolist() == expected


def test_clip_scores():
    scores = torch.tensor([-5.0, -1.0, 0.5, 7.0])
    assert clip_scores(scores, 2.0).tolist() == [-2.0, -1.0, 0.5, 2.0]
    unchanged = clip_scores(scores, None)
    assert unchanged.tolist() == scores.tolist() and unchanged is not scores
    with pytest.raises(ValueError, match="> 0"):
        clip_scores(scores, 0.0)


# ---- running moments and normalisation ----------------------------------------


def test_running_moments_hand_example():
    rm = RunningMoments()
    assert (rm.count, rm.mean, rm.std) == (0, 0.0, 0.0)
    rm.update(torch.tensor([1.0, 2.0, 3.0]))
    rm.update(torch.tensor([[4.0], [5.0]]))
    assert rm.count == 5
    assert rm.mean == pytest.approx(3.0)
    assert rm.std == pytest.approx(math.sqrt(2.5))  # sample std of 1..5
    rm.update(torch.tensor([]))
    assert rm.count == 5


def test_running_moments_matches_loop_reference():
    # Chan's chunked merge against Welford's one-at-a-time update, in float64.
    g = torch.Generator().manual_seed(4)
    chunks = [torch.randn(n, generator=g) * 3 + 10 for n in (1, 7, 2, 30)]
    rm = RunningMoments()
    for chunk in chunks:
        rm.update(chunk)
    n, mean, m2 = 0, 0.0, 0.0
    for x in torch.cat(chunks).double().tolist():
        n += 1
        delta = x - mean
        mean += delta / n
        m2 += delta * (x - mean)
    assert rm.count == n == 40
    assert rm.mean == pytest.approx(mean, rel=1e-12)
    assert rm.std == pytest.approx(math.sqrt(m2 / (n - 1)), rel=1e-12)
    all_scores = torch.cat(chunks).double()
    assert rm.std == pytest.approx(all_scores.std().item(), rel=1e-12)


def test_running_moments_state_round_trip():
    rm = RunningMoments()
    rm.update(torch.tensor([0.5, -1.0, 4.0]))
    state = rm.state_dict()
    restored = RunningMoments()
    restored.load_state_dict(state)
    assert restored.state_dict() == state
    batch = torch.tensor([2.0, 3.0])
    rm.update(batch)
    restored.update(batch)
    assert (restored.count, restored.mean, restored.std) == (rm.count, rm.mean, rm.std)


def test_running_moments_does_not_mutate_or_keep_graph():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    RunningMoments().update(x)
    assert x.tolist() == [1.0, 2.0] and x.grad is None


def test_normalize_scores():
    scores = torch.tensor([1.0, 3.0, 5.0])
    out = normalize_scores(scores, mean=3.0, std=2.0, eps=0.0)
    assert out.tolist() == [-1.0, 0.0, 1.0]
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(5, generator=g, dtype=torch.float64)
    expected = [(s - 0.3) / (1.7 + 1e-8) for s in scores.tolist()]
    torch.testing.assert_close(normalize_scores(scores, 0.3, 1.7).tolist(), expected)
