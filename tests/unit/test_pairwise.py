"""SFT and pairwise (Bradley-Terry) losses: hand examples, loop references, invariances."""

import math

import pytest
import torch

from rlhf_ray.algorithms.pairwise import PairwiseLossOutput, SFTLossOutput, pairwise_loss, sft_loss

# ---- pairwise loss: hand-computed -------------------------------------------------


def test_pairwise_loss_hand_example():
    # Differences [1, 0, -2]: -log sigmoid(d) = log(1 + e^-d).
    r_c = torch.tensor([1.0, 0.0, -1.0])
    r_r = torch.tensor([0.0, 0.0, 1.0])
    out = pairwise_loss(r_c, r_r)
    assert isinstance(out, PairwiseLossOutput)
    expected = (math.log(1 + math.exp(-1)) + math.log(2) + math.log(1 + math.exp(2))) / 3
    assert expected == pytest.approx(1.0444456, abs=1e-6)
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    # Only the first pair ranks chosen strictly above rejected; the tie counts as wrong.
    assert out.accuracy.item() == pytest.approx(1 / 3)
    assert not out.accuracy.requires_grad


def test_pairwise_loss_margin_hand_example():
    r_c = torch.tensor([1.0, 0.0, -1.0])
    r_r = torch.tensor([0.0, 0.0, 1.0])
    # Differences minus margin 1: [0, -1, -3].
    expected = (math.log(2) + math.log(1 + math.e) + math.log(1 + math.exp(3))) / 3
    assert pairwise_loss(r_c, r_r, margin=1.0).loss.item() == pytest.approx(expected, rel=1e-6)
    per_pair = pairwise_loss(r_c, r_r, margin=torch.tensor([1.0, 1.0, 1.0])).loss
    assert per_pair.item() == pytest.approx(expected, rel=1e-6)
    # Accuracy ignores the margin: it ranks rewards.
    assert pairwise_loss(r_c, r_r, margin=1.0).accuracy.item() == pytest.approx(1 / 3)


def test_pairwise_loss_gradient_hand_example():
    # d/d r_chosen of -log sigmoid(d) is -sigmoid(-d): -1/2 at d = 0, and +1/2 for r_rejected.
    r_c = torch.zeros(2, requires_grad=True)
    r_r = torch.zeros(2, requires_grad=True)
    pairwise_loss(r_c, r_r).loss.backward()
    assert r_c.grad.tolist() == pytest.approx([-0.25, -0.25])
    assert r_r.grad.tolist() == pytest.approx([0.25, 0.25])


def test_pairwise_loss_is_stable_for_large_differences():
    out = pairwise_loss(torch.tensor([-100.0, 100.0]), torch.tensor([100.0, -100.0]))
    assert out.loss.item() == pytest.approx(100.0, rel=1e-6)  # (200 + ~0) / 2
    assert math.isfinite(out.loss.item())


def test_pairwise_loss_loop_reference_float64():
    g = torch.Generator().manual_seed(0)
    r_c, r_r, m = (torch.randn(7, generator=g, dtype=torch.float64) for _ in range(3))
    ref = sum(math.log(1 + math.exp(-(c - r - mm))) for c, r, mm in zip(r_c.tolist(), r_r.tolist(), m.tolist())) / 7
    assert pairwise_loss(r_c, r_r, m).loss.item() == pytest.approx(ref, rel=1e-6)


def test_pairwise_loss_split_sums_to_full_batch():
    g = torch.Generator().manual_seed(1)
    r_c, r_r = torch.randn(6, generator=g), torch.randn(6, generator=g)
    full = pairwise_loss(r_c, r_r).loss
    parts = pairwise_loss(r_c[:2], r_r[:2], num_pairs=6).loss + pairwise_loss(r_c[2:], r_r[2:], num_pairs=6).loss
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_pairwise_loss_rejects_bad_shapes_and_counts():
    with pytest.raises(ValueError, match=r"shape \(B,\)"):
        pairwise_loss(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="shape"):
        pairwise_loss(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="margin"):
        pairwise_loss(torch.zeros(2), torch.zeros(2), margin=torch.zeros(3))
    with pytest.raises(ValueError, match="num_pairs"):
        pairwise_loss(torch.zeros(2), torch.zeros(2), num_pairs=0)


# ---- SFT loss ---------------------------------------------------------------------


def test_sft_loss_hand_example():
    # V = 2. Position 0: logits [0, 0] -> p(label 0) = 1/2. Position 1: [ln 3, 0] -> p(0) = 3/4.
    # Position 2 is prompt (masked): its huge logit must not count.
    logits = torch.tensor([[[0.0, 0.0], [math.log(3), 0.0], [-50.0, 50.0]]])
    labels = torch.tensor([[0, 0, 0]])
    mask = torch.tensor([[True, True, False]])
    out = sft_loss(logits, labels, mask)
    assert isinstance(out, SFTLossOutput)
    expected = (math.log(2) + math.log(4 / 3)) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)
    assert out.nll_mean.item() == pytest.approx(expected, rel=1e-6)
    # argmax of [0, 0] is 0 (first index), of [ln 3, 0] is 0: both right.
    assert out.token_accuracy.item() == pytest.approx(1.0)
    assert sft_loss(logits, labels, mask, num_tokens=4).loss.item() == pytest.approx(2 * expected / 4, rel=1e-6)


def _sft_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 5, 11, generator=g)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    mask = torch.tensor([[False, True, True, True, True],
                         [False, False, True, False, False],
                         [False, False, True, True, False]])
    return logits, labels, mask


def test_sft_loss_loop_reference_float64():
    logits, labels, mask = _sft_inputs(0)
    total, n = 0.0, 0
    for b in range(3):  # B != T on purpose: a reduction on the wrong axis fails here
        for t in range(5):
            if mask[b, t]:
                row = logits[b, t].double()
                total += -(row[labels[b, t]] - torch.logsumexp(row, 0)).item()
                n += 1
    assert sft_loss(logits, labels, mask).loss.item() == pytest.approx(total / n, rel=1e-5)


def test_sft_loss_ignores_masked_positions():
    logits, labels, mask = _sft_inputs(1)
    base = sft_loss(logits, labels, mask).loss
    logits2, labels2 = logits.clone(), labels.clone()
    logits2[~mask] = 1e4  # finite garbage (NaN logits would poison logsumexp's backward)
    labels2[~mask] = -100  # HF's ignore index: never used as an index
    logits2.requires_grad_(True)
    out = sft_loss(logits2, labels2, mask)
    assert out.loss.item() == pytest.approx(base.item(), rel=1e-6)
    out.loss.backward()
    assert torch.all(logits2.grad[~mask] == 0)
    assert torch.isfinite(logits2.grad).all()


def test_sft_loss_split_sums_to_full_batch():
    logits, labels, mask = _sft_inputs(2)
    full = sft_loss(logits, labels, mask).loss
    n = int(mask.sum())
    parts = sum(sft_loss(logits[i:i + 1], labels[i:i + 1], mask[i:i + 1], num_tokens=n).loss for i in range(3))
    assert parts.item() == pytest.approx(full.item(), rel=1e-6)


def test_sft_loss_shape_errors():
    logits, labels, mask = _sft_inputs(3)
    with pytest.raises(ValueError, match="mask shape"):
        sft_loss(logits, labels, mask[:, :4])
    with pytest.raises(ValueError, match="expected logits"):
        sft_loss(logits[0], labels, mask)


def test_pairwise_loss_centering_hand_example():
    # Pairs (2, 0) and (1, 3): BT terms softplus(-2) = 0.126928, softplus(2) = 2.126928; centering
    # (2 + 0)^2 = 4 and (1 + 3)^2 = 16, times 0.1 -> 0.4 and 1.6. Sum 4.253856 / 2 pairs.
    r_c, r_r = torch.tensor([2.0, 1.0]), torch.tensor([0.0, 3.0])
    out = pairwise_loss(r_c, r_r, center_coef=0.1)
    assert out.loss.item() == pytest.approx((0.126928 + 0.4 + 2.126928 + 1.6) / 2, abs=1e-5)
    # The centering gradient on a pair is 2c(r_c + r_r) on both scores: it moves a prompt's offset
    # (a shift of both scores) that the Bradley-Terry term cannot see.
    shifted = pairwise_loss(r_c + 5, r_r + 5, center_coef=0.1)
    plain, plain_shifted = pairwise_loss(r_c, r_r), pairwise_loss(r_c + 5, r_r + 5)
    assert plain.loss.item() == pytest.approx(plain_shifted.loss.item())
    assert shifted.loss.item() > out.loss.item() + 1.0
    with pytest.raises(ValueError, match="center_coef must be >= 0"):
        pairwise_loss(r_c, r_r, center_coef=-0.1)

