"""Policy-loss pieces: hand examples, float64 loop references, invariances, gradients."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    AGGREGATION_MODES,
    KL_ESTIMATORS,
    CorrectionOutput,
    SurrogateOutput,
    aggregate,
    clipped_surrogate,
    kl_estimate,
    kl_loss_tokens,
    rollout_correction,
    sequence_log_ratio,
)


def _mask(lengths=(5, 2, 4), r=5):
    return torch.arange(r)[None, :] < torch.tensor(lengths)[:, None]


def _inputs(seed: int, lengths=(5, 2, 4, 0)):
    """float64 (B=4, R=5) logprobs, old logprobs, advantages; one empty row."""
    g = torch.Generator().manual_seed(seed)
    b = len(lengths)
    old = -torch.rand(b, 5, generator=g, dtype=torch.float64) * 3
    new = old + 0.3 * torch.randn(b, 5, generator=g, dtype=torch.float64)
    adv = torch.randn(b, 5, generator=g, dtype=torch.float64)
    return new, old, adv, _mask(lengths)


# ---- sequence_log_ratio ----------------------------------------------------------


def test_sequence_log_ratio_hand_example():
    # Row 0: diffs 1, 0, 2 -> mean 1. Row 1: diff .5 -> .5. Row 2: empty -> 0.
    logprobs = torch.tensor([[-1.0, -2.0, -1.0, 9.0], [-1.0, 7.0, 7.0, 7.0], [3.0, 3.0, 3.0, 3.0]])
    old = torch.tensor([[-2.0, -2.0, -3.0, 0.0], [-1.5, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = _mask((3, 1, 0), 4)
    got = sequence_log_ratio(logprobs, old, mask)
    assert got.tolist() == [[1.0, 1.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0], [0.0] * 4]


def test_sequence_log_ratio_gradient_matches_loop():
    new, old, _, mask = _inputs(0)
    weights = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    leaf = new.clone().requires_grad_(True)
    (sequence_log_ratio(leaf, old, mask) * weights).sum().backward()
    # d/dlogp[i, k] of sum_t w[i, t] * mean_t'(diff) = sum_{valid t} w[i, t] / n_i, for valid k.
    expected = torch.zeros_like(new)
    for i in range(4):
        n = int(mask[i].sum())
        for k in range(5):
            if mask[i, k]:
                expected[i, k] = sum(weights[i, t].item() for t in range(5) if mask[i, t]) / n
    torch.testing.assert_close(leaf.grad, expected, rtol=1e-12, atol=1e-12)


# ---- clipped_surrogate: hand examples ------------------------------------------


def test_token_surrogate_hand_example():
    logprobs = torch.log(torch.tensor([[1.5, 0.5, 1.1, 7.0]])).requires_grad_(True)
    old = torch.zeros(1, 4)
    adv = torch.tensor([[1.0, -1.0, 2.0, 100.0]])
    mask = torch.tensor([[True, True, True, False]])
    out = clipped_surrogate(logprobs, old, adv, mask, 0.2)
    assert isinstance(out, SurrogateOutput)
    # r=1.5, A=1: max(-1.5, -1.2) = -1.2; r=.5, A=-1: max(.5, .8) = .8; r=1.1, A=2: -2.2.
    torch.testing.assert_close(out.per_token, torch.tensor([[-1.2, 0.8, -2.2, 0.0]]))
    assert out.clipped.tolist() == [[True, True, False, False]]
    torch.testing.assert_close(out.log_ratio, torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.0]])))
    assert not out.log_ratio.requires_grad and out.clipped.dtype == torch.bool
    out.per_token.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0, -2.2, 0.0]]))


def test_sequence_surrogate_hand_example():
    # Row 0: log diffs .2, .4 -> s = e^.3 = 1.3499 > 1.2, A = 1 -> clipped, -1.2 per token.
    # Row 1: log diffs -.1, .1 -> s = 1, A = -2 -> 2 per token, gradient -A * s = 2 per token
    # (each token's loss depends on both tokens through the mean: 2 tokens * 2 * 1/2).
    logprobs = torch.tensor([[0.2, 0.4, 5.0], [-0.1, 0.1, 5.0]], dtype=torch.float64)
    logprobs.requires_grad_(True)
    old = torch.zeros(2, 3, dtype=torch.float64)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, -2.0]], dtype=torch.float64)
    mask = _mask((2, 2), 3)
    out = clipped_surrogate(logprobs, old, adv, mask, 0.2, ratio="sequence")
    torch.testing.assert_close(
        out.per_token, torch.tensor([[-1.2, -1.2, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    )
    assert out.clipped.tolist() == [[True, True, False], [False, False, False]]
    torch.testing.assert_close(
        out.log_ratio, torch.tensor([[0.3, 0.3, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    )
    out.per_token.sum().backward()
    torch.testing.assert_close(
        logprobs.grad, torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 0.0]], dtype=torch.float64)
    )


def test_dual_clip_hand_example_both_ratio_levels():
    mask = torch.ones(2, 2, dtype=torch.bool)
    zeros = torch.zeros(2, 2, dtype=torch.float64)
    # Token level: r = [[5, 5], [2, 2]], A = [[-1, 1], [-1, -1]]:
    # max(5, 1.2) capped to 3 * |A| = 3; max(-5, -1.2) = -1.2 (clipped); max(2, 1.2) = 2 (below the cap).
    logprobs = torch.log(torch.tensor([[5.0, 5.0], [2.0, 2.0]], dtype=torch.float64)).requires_grad_(True)
    adv = torch.tensor([[-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    out = clipped_surrogate(logprobs, zeros, adv, mask, 0.2, dual_clip=3.0)
    assert out.per_token.tolist() == [[3.0, -1.2], [2.0, 2.0]]
    assert out.clipped.tolist() == [[False, True], [False, False]]
    out.per_token.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.float64))
    # Sequence level: row 0 has s = 4 and A = -1: capped at 3, no gradient. Row 1 has s = 2:
    # loss 2 per token, gradient per token = 2 tokens * (-A) * s / 2 = 2.
    logprobs = torch.log(torch.tensor([[2.0, 8.0], [2.0, 2.0]], dtype=torch.float64)).requires_grad_(True)
    out = clipped_surrogate(logprobs, zeros, -torch.ones(2, 2, dtype=torch.float64), mask, 0.2,
                            dual_clip=3.0, ratio="sequence")
    torch.testing.assert_close(out.per_token, torch.tensor([[3.0, 3.0], [2.0, 2.0]], dtype=torch.float64))
    out.per_token.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([[0.0, 0.0], [2.0, 2.0]], dtype=torch.float64))


# ---- clipped_surrogate: references ---------------------------------------------

CLIP_CASES = [(None, None), (0.3, None), (None, 1.5), (0.28, 2.0)]


def _loop_surrogate(new, old, adv, mask, eps_low, eps_high, dual, sequence):
    """Per-token loss and d(sum of losses)/d logprobs from the formulas, on Python floats."""
    b, r = new.shape
    per_token = torch.zeros_like(new)
    grad = torch.zeros_like(new)
    clipped = torch.zeros_like(mask)
    for i in range(b):
        valid = [t for t in range(r) if mask[i, t]]
        seq_log = sum(new[i, t].item() - old[i, t].item() for t in valid) / max(len(valid), 1)
        for t in valid:
            log_r = seq_log if sequence else new[i, t].item() - old[i, t].item()
            ratio, a = math.exp(log_r), adv[i, t].item()
            unclipped, clip_term = -a * ratio, -a * min(max(ratio, 1 - eps_low), 1 + eps_high)
            loss_t = max(unclipped, clip_term)
            capped = dual is not None and a < 0 and loss_t > -dual * a
            per_token[i, t] = -dual * a if capped else loss_t
            clipped[i, t] = clip_term > unclipped
            d_ratio = 0.0 if capped or clip_term > unclipped else -a  # d loss_t / d ratio
            if sequence:  # d ratio / d logp_k = ratio / n for every valid k of the row
                for k in valid:
                    grad[i, k] += d_ratio * ratio / len(valid)
            else:
                grad[i, t] += d_ratio * ratio
    return per_token, clipped, grad


@pytest.mark.parametrize("ratio", ["token", "sequence"])
@pytest.mark.parametrize("clip_high,dual", CLIP_CASES)
def test_surrogate_matches_loop_reference(ratio, clip_high, dual):
    new, old, adv, mask = _inputs(3)
    new[0, 1] += 1.5  # r = 4.5 on a token with A < 0: the dual clip caps it
    eps_low = 0.2 if ratio == "token" else 0.02  # GSPO ratios move less: keep both branches
    eps_high = eps_low if clip_high is None else (clip_high if ratio == "token" else 0.05)
    if ratio == "sequence":
        # Per-sequence spread of the mean log ratio, and per-token advantages.
        new = old + 0.1 * torch.randn(4, 5, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    exp_loss, exp_clipped, exp_grad = _loop_surrogate(new, old, adv, mask, eps_low, eps_high, dual,
                                                      ratio == "sequence")
    leaf = new.clone().requires_grad_(True)
    high = None if clip_high is None else eps_high
    out = clipped_surrogate(leaf, old, adv, mask, eps_low, clip_ratio_high=high, dual_clip=dual, ratio=ratio)
    out.per_token.sum().backward()
    torch.testing.assert_close(out.per_token.detach(), exp_loss, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.clipped, exp_clipped)
    torch.testing.assert_close(leaf.grad, exp_grad, rtol=1e-12, atol=1e-12)
    assert 0 < exp_clipped.sum() < mask.sum()  # both branches exercised


@pytest.mark.parametrize("ratio", ["token", "sequence"])
def test_surrogate_padding_changes_nothing(ratio):
    new, old, adv, mask = _inputs(4)

    def run(fill):
        def dirty(x):
            return x.clone() if fill is None else torch.where(mask, x, torch.full_like(x, fill))

        leaf = dirty(new).requires_grad_(True)
        out = clipped_surrogate(leaf, dirty(old), dirty(adv), mask, 0.2, dual_clip=3.0, ratio=ratio)
        out.per_token.sum().backward()
        return [*out, leaf.grad]

    clean = run(None)
    for fill in (math.inf, -math.inf, math.nan, 1e4):
        assert all(torch.equal(a, b) for a, b in zip(clean, run(fill)))
    per_token, clipped, log_ratio, grad = clean
    assert (per_token[~mask] == 0).all() and not clipped[~mask].any() and (log_ratio[~mask] == 0).all()
    assert (grad[~mask] == 0).all() and (grad[mask] != 0).any()


# ---- aggregate --------------------------------------------------------------------

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 50.0], [5.0, 7.0, 50.0], [9.0, 9.0, 9.0]])
AGG_MASK = _mask((3, 1, 2, 0), 3)


def test_aggregate_hand_example():
    def agg(mode, **kw):
        counts = {"step_tokens": 6, "step_sequences": 4} | kw
        return aggregate(PER_TOKEN, AGG_MASK, mode, **counts).item()

    assert agg("token_mean") == pytest.approx(22 / 6)  # (6 + 4 + 12) / 6 tokens
    assert agg("token_mean", step_tokens=11) == 2.0
    assert agg("seq_mean_token_mean") == 3.0  # (2 + 4 + 6 + 0) / 4
    assert agg("seq_mean_token_mean", step_sequences=6) == 2.0
    assert agg("seq_mean_token_sum_norm", max_len=4) == 1.375  # (6/4 + 4/4 + 12/4 + 0) / 4
    counts = {"step_tokens": torch.tensor(11.0), "step_sequences": torch.tensor(4.0)}
    assert aggregate(PER_TOKEN, AGG_MASK, "token_mean", **counts).item() == 2.0


def _loop_aggregate(per_token, mask, mode, step_tokens, step_sequences, max_len):
    total = 0.0
    for row, row_mask in zip(per_token.tolist(), mask.tolist()):
        vals = [v for v, m in zip(row, row_mask) if m]
        if mode == "token_mean":
            total += sum(vals) / step_tokens
        elif mode == "seq_mean_token_mean":
            total += (sum(vals) / len(vals) if vals else 0.0) / step_sequences
        else:
            total += sum(vals) / max_len / step_sequences
    return total


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_matches_loop_and_gradient(mode):
    x, _, _, mask = _inputs(5)
    leaf = x.clone().requires_grad_(True)
    got = aggregate(leaf, mask, mode, step_tokens=17, step_sequences=6, max_len=8)
    assert got.item() == pytest.approx(_loop_aggregate(x, mask, mode, 17, 6, 8), rel=1e-12)
    got.backward()
    n_i = mask.sum(-1, keepdim=True).double()
    expected = {"token_mean": 1 / 17 * torch.ones_like(x),
                "seq_mean_token_mean": 1 / (6 * n_i.clamp(min=1)).expand_as(x),
                "seq_mean_token_sum_norm": 1 / (8 * 6) * torch.ones_like(x)}[mode]
    torch.testing.assert_close(leaf.grad, torch.where(mask, expected, 0.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
@pytest.mark.parametrize("parts", [[[0], [1, 2, 3]], [[0, 1], [2], [3]], [[3, 1], [0, 2]]])
def test_aggregate_over_row_splits_sums_to_whole(mode, parts):
    x, _, _, mask = _inputs(6)
    counts = {"step_tokens": int(mask.sum()), "step_sequences": mask.shape[0], "max_len": 5}
    leaf = x.clone().requires_grad_(True)
    whole = aggregate(leaf, mask, mode, **counts)
    (whole_grad,) = torch.autograd.grad(whole, leaf)
    split = sum(aggregate(leaf[rows], mask[rows], mode, **counts) for rows in parts)
    (split_grad,) = torch.autograd.grad(split, leaf)
    torch.testing.assert_close(split, whole, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(split_grad, whole_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", AGGREGATION_MODES)
def test_aggregate_ignores_padding(mode):
    dirty = torch.where(AGG_MASK, PER_TOKEN, torch.full_like(PER_TOKEN, math.nan))
    kw = {"step_tokens": 6, "step_sequences": 4, "max_len": 3}
    assert torch.equal(aggregate(dirty, AGG_MASK, mode, **kw), aggregate(PER_TOKEN, AGG_MASK, mode, **kw))


def test_aggregate_bad_arguments_raise():
    kw = {"step_tokens": 6, "step_sequences": 4}
    with pytest.raises(ValueError, match="unknown loss aggregation 'seq_mean'"):
        aggregate(PER_TOKEN, AGG_MASK, "seq_mean", **kw)
    for bad in (0, -1, math.nan, math.inf):
        with pytest.raises(ValueError, match="step_tokens"):
            aggregate(PER_TOKEN, AGG_MASK, "token_mean", step_tokens=bad, step_sequences=4)
        with pytest.raises(ValueError, match="step_sequences"):
            aggregate(PER_TOKEN, AGG_MASK, "seq_mean_token_mean", step_tokens=6, step_sequences=bad)
    for bad in (None, 0):
        with pytest.raises(ValueError, match="max_len"):
            aggregate(PER_TOKEN, AGG_MASK, "seq_mean_token_sum_norm", **kw, max_len=bad)
    with pytest.raises(ValueError, match="bool"):
        aggregate(PER_TOKEN, AGG_MASK.float(), "token_mean", **kw)


# ---- rollout_correction -------------------------------------------------------------

# Valid raw weights w = [[1, 3, .25], [1.5, -, -]]: old = log w, rollout = 0.
W = torch.tensor([[1.0, 3.0, 0.25], [1.5, 1.0, 1.0]])
CORR_MASK = _mask((3, 1), 3)
OLD = torch.where(CORR_MASK, W.log(), torch.tensor(-5.0))
ROLLOUT = torch.where(CORR_MASK, torch.tensor(0.0), torch.tensor(math.nan))  # NaN only at padding


def test_rollout_correction_hand_examples():
    none = rollout_correction(OLD, ROLLOUT, CORR_MASK, "none")
    assert isinstance(none, CorrectionOutput)
    assert (none.weights == 1).all() and torch.equal(none.mask, CORR_MASK)
    assert none.weight_mean.item() == pytest.approx(5.75 / 4)
    assert none.weight_max.item() == pytest.approx(3.0)
    assert none.corrected_fraction.item() == 0.0

    tis = rollout_correction(OLD, ROLLOUT, CORR_MASK, "tis", cap=2.0)
    torch.testing.assert_close(tis.weights, torch.tensor([[1.0, 2.0, 0.25], [1.5, 1.0, 1.0]]))
    assert torch.equal(tis.mask, CORR_MASK)
    assert tis.corrected_fraction.item() == 0.25
    assert tis.weight_mean.item() == pytest.approx(5.75 / 4)  # raw w, before truncation

    ice = rollout_correction(OLD, ROLLOUT, CORR_MASK, "icepop", low=0.5, high=2.0)
    # kept tokens weighted by w (1 and 1.5), the out-of-band ones (3 and .25) by 0, padding by 1
    torch.testing.assert_close(ice.weights, torch.tensor([[1.0, 0.0, 0.0], [1.5, 1.0, 1.0]]))
    assert ice.mask.tolist() == [[True, False, False], [True, False, False]]
    assert ice.corrected_fraction.item() == 0.5
    assert ice.weights.dtype == torch.float32 and not ice.weights.requires_grad


def test_icepop_loss_hand_example():
    """IcePop's objective (arXiv:2510.18855): each sequence's token mean of M(w) x surrogate, with
    M(w) = w inside [low, high] and 0 outside; the dropped tokens still count in the length.
    On policy (r = 1) with advantages 1 the surrogate is -1 per token, so the weighted terms are
    [[-1, 0, 0], [-1.5]] and the loss is (-1/3 - 1.5) / 2 = -11/12."""
    lp = OLD.clone().requires_grad_(True)
    ice = rollout_correction(OLD, ROLLOUT, CORR_MASK, "icepop", low=0.5, high=2.0)
    sur = clipped_surrogate(lp, OLD, torch.ones(2, 3), ice.mask, 0.2)
    loss = aggregate(sur.per_token * ice.weights, CORR_MASK, "seq_mean_token_mean", step_tokens=4, step_sequences=2)
    assert loss.item() == pytest.approx(-11 / 12)
    loss.backward()
    # d/dlp of -w r / len / 2 at r = 1: -1/6 and -3/4 at the kept tokens, 0 where dropped or padding
    torch.testing.assert_close(lp.grad, torch.tensor([[-1 / 6, 0.0, 0.0], [-0.75, 0.0, 0.0]]))
    token_mean = aggregate(sur.per_token * ice.weights, CORR_MASK, "token_mean", step_tokens=4, step_sequences=2)
    assert token_mean.item() == pytest.approx(-2.5 / 4)


def test_rollout_correction_nan_rollout_logprobs():
    rollout = ROLLOUT.clone()
    rollout[0, 1] = math.nan
    for mode in ("tis", "icepop"):
        with pytest.raises(ValueError, match="return logprobs"):
            rollout_correction(OLD, rollout, CORR_MASK, mode)
    # Mode "none" accepts them; metrics cover the tokens whose rollout logprob is known.
    none = rollout_correction(OLD, rollout, CORR_MASK, "none")
    assert none.weight_mean.item() == pytest.approx(2.75 / 3)
    assert none.weight_max.item() == pytest.approx(1.5)
    all_nan = rollout_correction(OLD, torch.full_like(OLD, math.nan), CORR_MASK, "none")
    assert all_nan.weight_mean.item() == 0.0 and all_nan.weight_max.item() == 0.0


@pytest.mark.parametrize("mode", ["none", "tis", "icepop"])
def test_rollout_correction_matches_loop_reference(mode):
    g = torch.Generator().manual_seed(10)
    rollout = -torch.rand(4, 5, generator=g, dtype=torch.float64) * 3
    old = rollout + 0.8 * torch.randn(4, 5, generator=g, dtype=torch.float64)
    mask = _mask((5, 2, 4, 0))
    out = rollout_correction(old, rollout, mask, mode, cap=1.5, low=0.6, high=1.8)
    weights, keep, raw, corrected = torch.ones(4, 5, dtype=torch.float64), mask.clone(), [], 0
    for i in range(4):
        for t in range(5):
            if not mask[i, t]:
                continue
            w = math.exp(old[i, t].item() - rollout[i, t].item())
            raw.append(w)
            if mode == "tis":
                weights[i, t] = min(w, 1.5)
                corrected += w > 1.5
            if mode == "icepop":
                inside = 0.6 <= w <= 1.8
                weights[i, t] = w if inside else 0.0
                keep[i, t] = inside
                corrected += not inside
    torch.testing.assert_close(out.weights, weights, rtol=1e-12, atol=1e-12)
    assert torch.equal(out.mask, keep)
    assert out.weight_mean.item() == pytest.approx(sum(raw) / len(raw), rel=1e-12)
    assert out.weight_max.item() == pytest.approx(max(raw), rel=1e-12)
    assert out.corrected_fraction.item() == pytest.approx(corrected / len(raw))
    if mode != "none":
        assert 0 < corrected < len(raw)


@pytest.mark.parametrize("mode", ["none", "tis", "icepop"])
def test_rollout_correction_padding_and_grad_free(mode):
    old = OLD.clone().requires_grad_(True)
    clean = rollout_correction(old, ROLLOUT, CORR_MASK, mode)
    assert not any(x.requires_grad for x in clean)
    dirty_old = torch.where(CORR_MASK, OLD, torch.tensor(math.inf))
    dirty = rollout_correction(dirty_old, torch.where(CORR_MASK, ROLLOUT, -math.inf), CORR_MASK, mode)
    assert all(torch.equal(a, b) for a, b in zip(clean, dirty))
    assert rollout_correction(OLD.bfloat16(), ROLLOUT.bfloat16(), CORR_MASK, mode).weights.dtype == torch.float32


def test_rollout_correction_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown rollout correction"):
        rollout_correction(OLD, ROLLOUT, CORR_MASK, "is")
    with pytest.raises(ValueError, match="cap"):
        rollout_correction(OLD, ROLLOUT, CORR_MASK, "tis", cap=0.0)
    for low, high in ((2.0, 0.5), (1.2, 2.0), (0.5, 0.9)):
        with pytest.raises(ValueError, match="icepop"):
            rollout_correction(OLD, ROLLOUT, CORR_MASK, "icepop", low=low, high=high)
    with pytest.raises(ValueError, match="rollout_logprobs shape"):
        rollout_correction(OLD, ROLLOUT[:, :2], CORR_MASK, "none")


# ---- kl_loss_tokens -------------------------------------------------------------------


def test_kl_loss_tokens_hand_example():
    # d = logprobs - ref = 1, -1, 0.
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    ref = torch.tensor([[-2.0, -1.0, -0.5]])
    torch.testing.assert_close(kl_loss_tokens(logp, ref, "k1"), torch.tensor([[1.0, -1.0, 0.0]]))
    torch.testing.assert_close(kl_loss_tokens(logp, ref, "k2"), torch.tensor([[0.5, 0.5, 0.0]]))
    # k3 = e^-1 + 1 - 1 = .3679; e^1 - 1 - 1 = .7183.
    torch.testing.assert_close(kl_loss_tokens(logp, ref, "k3"), torch.tensor([[0.36787944, 0.71828183, 0.0]]))


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_loss_tokens_gradient_matches_autograd_of_loop(estimator):
    new, _, _, _ = _inputs(11)
    ref = new - 0.5 * torch.randn(4, 5, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    formulas = {"k1": lambda p, q: p - q,
                "k2": lambda p, q: 0.5 * (p - q) ** 2,
                "k3": lambda p, q: torch.exp(q - p) - (q - p) - 1.0}
    analytic = {"k1": lambda d: torch.ones_like(d), "k2": lambda d: d, "k3": lambda d: 1 - torch.exp(-d)}
    a = new.clone().requires_grad_(True)
    b = new.clone().requires_grad_(True)
    got = kl_loss_tokens(a, ref, estimator)
    loop = torch.stack([torch.stack([formulas[estimator](b[i, t], ref[i, t]) for t in range(5)])
                        for i in range(4)])
    torch.testing.assert_close(got, loop, rtol=1e-12, atol=1e-12)
    assert torch.equal(got, kl_estimate(new, ref, estimator))
    got.sum().backward()
    loop.sum().backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.grad, analytic[estimator](new - ref), rtol=1e-12, atol=1e-12)


def test_kl_loss_expected_gradients():
    # Exact expectation over a 7-token vocabulary of the per-token loss gradient, on-policy.
    g = torch.Generator().manual_seed(13)
    theta = torch.randn(7, generator=g, dtype=torch.float64, requires_grad=True)
    ref = torch.log_softmax(torch.randn(7, generator=g, dtype=torch.float64), -1)

    def expected_grad(estimator):
        logp = torch.log_softmax(theta, -1)
        loss = (logp.exp().detach() * kl_loss_tokens(logp[None], ref[None], estimator)[0]).sum()
        return torch.autograd.grad(loss, theta)[0]

    def kl_grad(forward):
        p = torch.log_softmax(theta, -1)
        kl = (p.exp() * (p - ref)).sum() if not forward else (ref.exp() * (ref - p)).sum()
        return torch.autograd.grad(kl, theta)[0]

    torch.testing.assert_close(expected_grad("k1"), torch.zeros(7, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(expected_grad("k2"), kl_grad(forward=False), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(expected_grad("k3"), kl_grad(forward=True), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
def test_kl_loss_tokens_mask_hides_padding(estimator):
    new, _, _, mask = _inputs(14)
    ref = new - 0.3

    def run(fill):
        lp = torch.where(mask, new, torch.full_like(new, fill)).requires_grad_(True)
        out = kl_loss_tokens(lp, torch.where(mask, ref, torch.full_like(ref, -fill)), estimator, mask=mask)
        out.sum().backward()
        return out, lp.grad

    clean_out, clean_grad = run(0.0)
    for fill in (math.inf, math.nan, 80.0):
        out, grad = run(fill)
        assert torch.equal(out, clean_out) and torch.equal(grad, clean_grad)
    assert (clean_out[~mask] == 0).all() and (clean_grad[~mask] == 0).all()
    torch.testing.assert_close(clean_out[mask], kl_estimate(new, ref, estimator)[mask])


def test_kl_loss_tokens_bad_arguments_raise():
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_loss_tokens(torch.zeros(2, 3), torch.zeros(2, 3), "k4")
    with pytest.raises(ValueError, match="bool"):
        kl_loss_tokens(torch.zeros(2, 3), torch.zeros(2, 3), "k1", mask=torch.ones(2, 3))
