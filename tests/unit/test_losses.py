"""PPO policy and value losses: hand examples, float64 loop references, invariances.

The policy loss is the learner's own composition (``workers/objective.py`` with ppo.loss_agg
token_mean, no correction, no KL term): ``clipped_surrogate`` aggregated by ``aggregate`` over
the step's valid tokens."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    SurrogateOutput,
    ValueLossOutput,
    aggregate,
    clipped_surrogate,
    token_mean_loss,
    value_loss,
)


def _mask(lengths=(5, 2, 4), r=5):
    return torch.arange(r)[None, :] < torch.tensor(lengths)[:, None]


def _policy_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    # Log ratios of spread 0.3, so that both branches of the clip occur.
    new = old + 0.3 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(3, 5, generator=g, dtype=torch.float64)
    return new, old, adv, _mask()


def _policy_loss(logprobs, old, adv, mask, clip_ratio, *, clip_ratio_high=None, dual_clip=None, num_tokens=None):
    """(token-mean policy loss, surrogate) as the learner composes them; ``num_tokens`` is the
    step's valid-token count (default: this batch's, at least 1)."""
    sur = clipped_surrogate(logprobs, old, adv, mask, clip_ratio, clip_ratio_high=clip_ratio_high, dual_clip=dual_clip)
    tokens = num_tokens if num_tokens is not None else max(int(mask.sum()), 1)
    return aggregate(sur.per_token, mask, "token_mean", step_tokens=tokens, step_sequences=1), sur


def _value_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(3, 5, generator=g, dtype=torch.float64)
    new = old + 0.4 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    returns = torch.randn(3, 5, generator=g, dtype=torch.float64)
    return new, old, returns, _mask()


# ---- token_mean_loss -----------------------------------------------------------


def test_token_mean_loss_hand_example():
    per_token = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    mask = torch.tensor([[True, False], [True, True]])
    assert token_mean_loss(per_token, mask).item() == pytest.approx(8.0 / 3.0)
    assert token_mean_loss(per_token, mask, num_tokens=4).item() == 2.0
    assert token_mean_loss(per_token, mask, num_tokens=torch.tensor(16.0)).item() == 0.5
    assert token_mean_loss(per_token, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="num_tokens"):
        token_mean_loss(per_token, mask, num_tokens=0)


# ---- policy loss: hand examples ------------------------------------------------


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    _, old, adv, mask = _policy_inputs(0)
    loss, sur = _policy_loss(old, old, adv, mask, clip_ratio=0.2)
    assert isinstance(sur, SurrogateOutput)
    expected = -sum(adv[mask].tolist()) / int(mask.sum())
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert not sur.clipped.any()
    assert torch.equal(sur.log_ratio, torch.zeros_like(old))  # ratio 1 everywhere


def test_policy_loss_clip_hand_example():
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1, 7.0]]))
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    logprobs.requires_grad_(True)
    loss, sur = _policy_loss(logprobs, old, adv, mask, clip_ratio=0.2)
    # r=1.5, A=1:  max(-1.5, -1.2) = -1.2 (clipped);
    # r=0.5, A=-1: max(0.5, 0.8) = 0.8 (clipped);
    # r=1.1, A=2:  -2.2 in both branches (not clipped).
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 2.2) / 3)
    assert sur.clipped.tolist() == [[True, True, False, False]]  # padding never counts as clipped
    assert sur.log_ratio.exp()[mask].tolist() == pytest.approx([1.5, 0.5, 1.1])
    assert sur.log_ratio[0, 3].item() == 0.0
    loss.backward()
    # Only the unclipped token has a gradient: d(-A r)/d logp = -A r / N.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -2.2 / 3, 0.0]]))


def test_policy_loss_clip_higher_hand_example():
    logprobs = torch.log(torch.tensor([[1.25]]))
    zeros, ones, mask = torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1, dtype=torch.bool)
    symmetric, sym_sur = _policy_loss(logprobs, zeros, ones, mask, 0.2)
    higher, high_sur = _policy_loss(logprobs, zeros, ones, mask, 0.2, clip_ratio_high=0.28)
    assert symmetric.item() == pytest.approx(-1.2)
    assert higher.item() == pytest.approx(-1.25)
    assert (sym_sur.clipped.item(), high_sur.clipped.item()) == (True, False)


def test_policy_loss_dual_clip_hand_example():
    ratios = torch.tensor([[5.0, 5.0, 2.0]])
    adv = torch.tensor([[-1.0, 1.0, -1.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    logprobs = torch.log(ratios).requires_grad_(True)
    plain, _ = _policy_loss(logprobs.detach(), torch.zeros(1, 3), adv, mask, 0.2)
    dual, _ = _policy_loss(logprobs, torch.zeros(1, 3), adv, mask, 0.2, dual_clip=3.0)
    # Per token without dual clip: max(5, 1.2) = 5; max(-5, -1.2) = -1.2; max(2, 1.2) = 2.
    assert plain.item() == pytest.approx((5.0 - 1.2 + 2.0) / 3)
    # Dual clip caps the A < 0 tokens at 3 * |A|: min(5, 3) = 3, min(2, 3) = 2.
    assert dual.item() == pytest.approx((3.0 - 1.2 + 2.0) / 3)
    dual.backward()
    # Capped and clipped tokens get no gradient; the last one gets -A r / N.
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, 2.0 / 3]]))


# ---- policy loss: float64 loop reference --------------------------------------


@pytest.mark.parametrize("clip_high,dual", [(None, None), (0.3, None), (None, 1.5), (0.28, 2.0)])
def test_policy_loss_matches_loop_reference(clip_high, dual):
    new, old, adv, mask = _policy_inputs(1)
    eps_low, eps_high = 0.2, clip_high if clip_high is not None else 0.2
    n = int(mask.sum())
    total, grads, clipped_count = 0.0, torch.zeros_like(new), 0
    for i in range(3):
        for t in range(5):
            if not mask[i, t]:
                continue
            a, r = adv[i, t].item(), math.exp(new[i, t].item() - old[i, t].item())
            unclipped, clipped = -a * r, -a * min(max(r, 1 - eps_low), 1 + eps_high)
            loss_t = max(unclipped, clipped)
            capped = dual is not None and a < 0 and loss_t > -dual * a
            if capped:
                loss_t = -dual * a
            total += loss_t
            clipped_count += clipped > unclipped
            grads[i, t] = 0.0 if capped or clipped > unclipped else -a * r / n
    logprobs = new.clone().requires_grad_(True)
    loss, sur = _policy_loss(logprobs, old, adv, mask, eps_low, clip_ratio_high=clip_high, dual_clip=dual)
    loss.backward()
    assert loss.item() == pytest.approx(total / n, rel=1e-12)
    assert int(sur.clipped.sum()) == clipped_count
    assert 0 < clipped_count < n  # both branches exercised
    torch.testing.assert_close(logprobs.grad, grads, rtol=1e-12, atol=1e-12)


# ---- value loss: hand examples -------------------------------------------------


def test_value_loss_unclipped_hand_example():
    values = torch.tensor([[1.0, 2.0, 50.0]])
    returns = torch.zeros(1, 3)
    mask = torch.tensor([[True, True, False]])
    out = value_loss(values, values, returns, mask)
    assert isinstance(out, ValueLossOutput)
    assert out.loss.item() == pytest.approx(0.5 * (1.0 + 4.0) / 2)
    assert out.clip_fraction.item() == 0.0


def test_value_loss_clip_hand_example():
    values = torch.tensor([[1.0, 1.0, 0.1]], requires_grad=True)
    old = torch.zeros(1, 3)
    returns = torch.tensor([[2.0, -1.0, 0.0]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    out = value_loss(values, old, returns, mask, clip_range=0.2)
    # Token 0: V_clip = 0.2; max((1-2)^2, (0.2-2)^2) = 3.24 -> clipped, 1.62.
    # Token 1: V_clip = 0.2; max((1+1)^2, (0.2+1)^2) = 4    -> unclipped, 2.
    # Token 2: inside the clip range: 0.5 * 0.01 = 0.005.
    assert out.loss.item() == pytest.approx((1.62 + 2.0 + 0.005) / 3)
    assert out.clip_fraction.item() == pytest.approx(1.0 / 3.0)
    out.loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 2.0 / 3, 0.1 / 3]]))


@pytest.mark.parametrize("clip_range", [None, 0.2])
def test_value_loss_matches_loop_reference(clip_range):
    new, old, returns, mask = _value_inputs(2)
    n = int(mask.sum())
    total, grads, clipped_count = 0.0, torch.zeros_like(new), 0
    for i in range(3):
        for t in range(5):
            if not mask[i, t]:
                continue
            v, v_old, ret = new[i, t].item(), old[i, t].item(), returns[i, t].item()
            unclipped = (v - ret) ** 2
            if clip_range is None:
                clipped = -math.inf
            else:
                v_clip = v_old + min(max(v - v_old, -clip_range), clip_range)
                clipped = (v_clip - ret) ** 2
            total += 0.5 * max(unclipped, clipped)
            clipped_count += clipped > unclipped
            grads[i, t] = 0.0 if clipped > unclipped else (v - ret) / n
    values = new.clone().requires_grad_(True)
    out = value_loss(values, old, returns, mask, clip_range=clip_range)
    out.loss.backward()
    assert out.loss.item() == pytest.approx(total / n, rel=1e-12)
    assert out.clip_fraction.item() == pytest.approx(clipped_count / n)
    if clip_range is not None:
        assert 0 < clipped_count < n
    torch.testing.assert_close(values.grad, grads, rtol=1e-12, atol=1e-12)


# ---- invariances ---------------------------------------------------------------


def _split_sum(loss_fn, tensors, mask, grad_index):
    """Full-batch loss and gradient vs. the sum over a 2-way split of the rows."""
    n = int(mask.sum())
    leaf = tensors[grad_index].clone().requires_grad_(True)
    args = list(tensors)
    args[grad_index] = leaf
    full = loss_fn(*args, mask, num_tokens=n)
    (full_grad,) = torch.autograd.grad(full, leaf)
    parts = []
    for rows in (slice(0, 1), slice(1, 3)):  # uneven token counts: 5 vs 2 + 4
        part_args = [x[rows] for x in args]
        parts.append(loss_fn(*part_args, mask[rows], num_tokens=n))
    split_grad = torch.autograd.grad(parts[0] + parts[1], leaf)[0]
    return full, parts[0] + parts[1], full_grad, split_grad


def test_policy_loss_split_batch_sums_to_full_batch():
    new, old, adv, mask = _policy_inputs(3)

    def loss_fn(lp, lp_old, a, m, num_tokens):
        return _policy_loss(lp, lp_old, a, m, 0.2, dual_clip=2.0, num_tokens=num_tokens)[0]

    full, split, full_grad, split_grad = _split_sum(loss_fn, (new, old, adv), mask, 0)
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-12, atol=1e-12)
    assert full_grad.abs().sum() > 0
    # With the local default divisor the halves do NOT add up (the reason for num_tokens).
    halves = (slice(0, 1), slice(1, 3))
    local = sum(loss_fn(new[r], old[r], adv[r], mask[r], None) for r in halves)
    assert local.item() != pytest.approx(full.item())


def test_value_loss_split_batch_sums_to_full_batch():
    new, old, returns, mask = _value_inputs(4)

    def loss_fn(v, v_old, g, m, num_tokens):
        return value_loss(v, v_old, g, m, clip_range=0.2, num_tokens=num_tokens).loss

    full, split, full_grad, split_grad = _split_sum(loss_fn, (new, old, returns), mask, 0)
    torch.testing.assert_close(split, full, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_grad, full_grad, rtol=1e-12, atol=1e-12)


def _losses_with_padding(fill, new, old, adv, mask):
    """Both losses and their gradients with the padding filled by ``fill``."""
    def dirty(x):
        return x.clone() if fill is None else torch.where(mask, x, fill)

    logprobs = dirty(new).requires_grad_(True)
    values = dirty(new).requires_grad_(True)
    pol, sur = _policy_loss(logprobs, dirty(old), dirty(adv), mask, 0.2, dual_clip=3.0)
    val = value_loss(values, dirty(old), dirty(adv), mask, clip_range=0.2)
    (pol + val.loss).backward()
    return [pol, *sur, *val, logprobs.grad, values.grad]


def test_masked_positions_change_neither_loss_nor_gradient():
    new, old, adv, mask = _policy_inputs(5)
    clean = _losses_with_padding(None, new, old, adv, mask)
    for fill in (math.inf, math.nan, -1e4):
        dirty = _losses_with_padding(fill, new, old, adv, mask)
        for a, b in zip(clean, dirty):
            assert torch.equal(a, b)
    policy_grad, value_grad = clean[-2:]
    assert (policy_grad[~mask] == 0).all() and (value_grad[~mask] == 0).all()
    assert (policy_grad[mask] != 0).any() and (value_grad[mask] != 0).any()


def test_metrics_detached_and_inputs_not_mutated():
    new, old, adv, mask = _policy_inputs(6)
    before = [x.clone() for x in (new, old, adv, mask)]
    logprobs = new.clone().requires_grad_(True)
    loss, sur = _policy_loss(logprobs, old, adv, mask, 0.2)
    assert loss.requires_grad and loss.dim() == 0
    assert sur.per_token.requires_grad
    assert not sur.clipped.requires_grad and not sur.log_ratio.requires_grad
    vout = value_loss(logprobs, old, adv, mask, clip_range=0.1)
    assert vout.loss.requires_grad and not vout.clip_fraction.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(before, (new, old, adv, mask)))


def test_bad_arguments_raise():
    new, old, adv, mask = _policy_inputs(7)
    with pytest.raises(ValueError, match="dual_clip"):
        clipped_surrogate(new, old, adv, mask, 0.2, dual_clip=1.0)
    with pytest.raises(ValueError, match="clip_ratio"):
        clipped_surrogate(new, old, adv, mask, 0.0)
    with pytest.raises(ValueError, match="advantages"):
        clipped_surrogate(new, old, adv[:, :4], mask, 0.2)
    with pytest.raises(ValueError, match="clip_range"):
        value_loss(new, old, adv, mask, clip_range=-0.1)
    with pytest.raises(ValueError, match="bool"):
        value_loss(new, old, adv, mask.double())
