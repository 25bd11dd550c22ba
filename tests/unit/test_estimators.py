"""Advantage estimators: hand examples, float64 loop references, invariances; and a hand-computed
case for every entry of the estimator table (``ESTIMATORS``)."""

import math

import pytest
import torch

from rlhf_ray.algorithms import (
    ESTIMATORS,
    AdvantageInputs,
    group_baseline_scores,
    group_counts,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)


def _mask(lengths, r):
    return torch.arange(r)[None, :] < torch.tensor(lengths)[:, None]


# Six samples, R = 4: groups 0 (two samples), 5 (three) and 9 (alone).
SCORES = torch.tensor([1.0, 0.0, 0.0, 3.0, 6.0, 4.0])
GROUPS = torch.tensor([0, 0, 5, 5, 5, 9])
LENGTHS = [4, 2, 3, 1, 4, 2]
MASK = _mask(LENGTHS, 4)
SQRT_HALF = math.sqrt(0.5)


def _expected_tokens(per_sample, lengths=LENGTHS, r=4, dtype=torch.float32):
    """Broadcast literal per-sample values to a (B, R) tensor with zero padding."""
    return torch.tensor([[v if t < n else 0.0 for t in range(r)] for v, n in zip(per_sample, lengths)],
                        dtype=dtype)


# ---- hand-computed examples ----------------------------------------------------


def test_group_counts_hand_example():
    assert group_counts(GROUPS).tolist() == [2, 2, 3, 3, 3, 1]
    valid = torch.tensor([True, True, True, False, True, False])
    assert group_counts(GROUPS, valid).tolist() == [2, 2, 2, 2, 2, 0]
    assert group_counts(GROUPS).dtype == torch.long


def test_grpo_hand_example():
    # Group 0: [1, 0], mean .5, unbiased std sqrt(.5) -> +-.5 / .7071 = +-.7071.
    # Group 5: [0, 3, 6], mean 3, unbiased std sqrt(18 / 2) = 3 -> [-1, 0, 1].
    # Group 9: one sample, no baseline -> 0.
    adv = grpo_advantages(SCORES, GROUPS, MASK)
    expected = _expected_tokens([SQRT_HALF, -SQRT_HALF, -1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(adv, expected, rtol=1e-5, atol=1e-5)
    assert adv.dtype == torch.float32 and adv.shape == (6, 4)


def test_dr_grpo_hand_example():
    adv = grpo_advantages(SCORES, GROUPS, MASK, std_norm=False)
    assert adv.tolist() == _expected_tokens([0.5, -0.5, -3.0, 0.0, 3.0, 0.0]).tolist()


def test_rloo_hand_example():
    # Group 0: 1 - 0 = 1, 0 - 1 = -1. Group 5: 0 - (3+6)/2, 3 - (0+6)/2, 6 - (0+3)/2.
    adv = rloo_advantages(SCORES, GROUPS, MASK)
    assert adv.tolist() == _expected_tokens([1.0, -1.0, -4.5, 0.0, 4.5, 0.0]).tolist()


def test_group_baseline_scores_hand_example():
    assert group_baseline_scores(SCORES, GROUPS).tolist() == [0.5, -0.5, -3.0, 0.0, 3.0, 0.0]
    valid = torch.tensor([True, True, True, False, True, True])
    scores = SCORES.clone()
    scores[3] = math.nan  # a quarantined sample's score may be garbage
    assert group_baseline_scores(scores, GROUPS, valid=valid).tolist() == [0.5, -0.5, -3.0, 0.0, 3.0, 0.0]


def test_invalid_sample_hand_example():
    # Sample 3 is quarantined (empty mask row, NaN score): group 5 is now [0, 6].
    scores = SCORES.clone()
    scores[3] = math.nan
    lengths = [4, 2, 3, 0, 4, 2]
    mask = _mask(lengths, 4)
    grpo = grpo_advantages(scores, GROUPS, mask)
    expected = _expected_tokens([SQRT_HALF, -SQRT_HALF, -SQRT_HALF, 0.0, SQRT_HALF, 0.0], lengths)
    torch.testing.assert_close(grpo, expected, rtol=1e-5, atol=1e-5)
    rloo = rloo_advantages(scores, GROUPS, mask)
    assert rloo.tolist() == _expected_tokens([1.0, -1.0, -6.0, 0.0, 6.0, 0.0], lengths).tolist()


def test_constant_group_gets_zero():
    scores = torch.tensor([2.0, 2.0, 2.0, 1.0, 0.0])
    groups = torch.tensor([4, 4, 4, 1, 1])
    mask = torch.ones(5, 3, dtype=torch.bool)
    for adv in (grpo_advantages(scores, groups, mask), rloo_advantages(scores, groups, mask)):
        assert (adv[:3] == 0).all() and (adv[3:] != 0).all()


def test_reinforce_pp_hand_example():
    # gamma 1: returns are suffix sums. Valid returns [1, 1, 1, .5]: mean .875,
    # unbiased var (3 * .125^2 + .375^2) / 3 = .0625, std .25.
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.5, 7.0, 7.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    adv, ret = reinforce_pp_advantages(rewards, mask)
    assert ret.tolist() == [[1.0, 1.0, 1.0], [0.5, 0.0, 0.0]]
    expected = torch.tensor([[0.5, 0.5, 0.5], [-1.5, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(adv, expected, rtol=1e-6, atol=1e-6)


def test_reinforce_pp_discounted_returns_hand_example():
    # gamma .5: G_2 = 4, G_1 = 2 + .5 * 4 = 4, G_0 = 1 + .5 * 4 = 3.
    rewards = torch.tensor([[1.0, 2.0, 4.0], [2.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    _, ret = reinforce_pp_advantages(rewards, mask, gamma=0.5)
    assert ret.tolist() == [[3.0, 4.0, 4.0], [2.0, 0.0, 0.0]]


# ---- float64 loop references ----------------------------------------------------


def _random_groups(seed: int, b: int = 13, r: int = 5):
    """Scores, non-contiguous unsorted group ids of mixed sizes, a ragged mask with
    two empty (quarantined) rows, and NaN scores on those rows."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, generator=g, dtype=torch.float64)
    ids = torch.tensor([42, 7, 100, 3, 11])
    groups = ids[torch.tensor([0, 1, 0, 2, 1, 0, 3, 1, 0, 2, 4, 4, 1])]  # sizes 4, 4, 2, 1, 2
    lengths = torch.randint(1, r + 1, (b,), generator=g)
    lengths[[4, 10]] = 0  # group 7 loses one sample, group 11 keeps one
    mask = _mask(lengths.tolist(), r)
    scores[[4, 10]] = math.nan
    return scores, groups, mask


def _loop_group_advantages(scores, groups, valid, kind, eps=1e-6):
    out = []
    for i in range(len(scores)):
        if not valid[i]:
            out.append(0.0)
            continue
        members = [scores[j] for j in range(len(scores)) if valid[j] and groups[j] == groups[i]]
        n = len(members)
        if n < 2:
            out.append(0.0)
            continue
        mean = sum(members) / n
        if kind == "grpo":
            std = math.sqrt(sum((s - mean) ** 2 for s in members) / (n - 1))
            out.append((scores[i] - mean) / (std + eps))
        elif kind == "dr_grpo":
            out.append(scores[i] - mean)
        else:  # rloo
            out.append(scores[i] - (sum(members) - scores[i]) / (n - 1))
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["grpo", "dr_grpo", "rloo"])
def test_group_estimators_match_loop_reference(seed, kind):
    scores, groups, mask = _random_groups(seed)
    valid = mask.any(-1).tolist()
    per_sample = _loop_group_advantages(scores.tolist(), groups.tolist(), valid, kind)
    expected = torch.tensor(per_sample, dtype=torch.float64)[:, None] * mask
    if kind == "rloo":
        got = rloo_advantages(scores, groups, mask)
    else:
        got = grpo_advantages(scores, groups, mask, std_norm=kind == "grpo")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert (got[mask.any(-1)] != 0).any()


@pytest.mark.parametrize("seed", [0, 1])
def test_group_counts_and_baseline_match_loop_reference(seed):
    scores, groups, mask = _random_groups(seed)
    valid = mask.any(-1)
    v, s, gr = valid.tolist(), scores.tolist(), groups.tolist()
    counts = [sum(v[j] and gr[j] == gr[i] for j in range(len(s))) for i in range(len(s))]
    assert group_counts(groups, valid).tolist() == counts
    expected = _loop_group_advantages(s, gr, v, "dr_grpo")
    torch.testing.assert_close(
        group_baseline_scores(scores, groups, valid=valid), torch.tensor(expected, dtype=torch.float64),
        rtol=1e-12, atol=1e-12,
    )


def _loop_reinforce_pp(rewards, mask, gamma):
    b, r = len(rewards), len(rewards[0])
    returns = [[0.0] * r for _ in range(b)]
    for i in range(b):
        for t in range(r):
            if mask[i][t]:
                returns[i][t] = sum(
                    gamma ** (k - t) * rewards[i][k] for k in range(t, r) if mask[i][k]
                )
    flat = [returns[i][t] for i in range(b) for t in range(r) if mask[i][t]]
    mean = sum(flat) / len(flat)
    var = sum((x - mean) ** 2 for x in flat) / (len(flat) - 1)
    adv = [[(returns[i][t] - mean) / math.sqrt(var + 1e-8) if mask[i][t] else 0.0
            for t in range(r)] for i in range(b)]
    return adv, returns


@pytest.mark.parametrize("gamma", [1.0, 0.9, 0.0])
def test_reinforce_pp_matches_loop_reference(gamma):
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(3, 5, generator=g, dtype=torch.float64)
    mask = _mask([5, 2, 4], 5)
    mask[1, 3] = True  # a hole: nothing assumes right padding
    adv, ret = reinforce_pp_advantages(rewards, mask, gamma=gamma)
    exp_adv, exp_ret = _loop_reinforce_pp(rewards.tolist(), mask.tolist(), gamma)
    torch.testing.assert_close(ret, torch.tensor(exp_ret, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adv, torch.tensor(exp_adv, dtype=torch.float64), rtol=1e-12, atol=1e-12)


# ---- invariances ---------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "rloo"])
def test_invalid_samples_do_not_move_others(estimator):
    def run(scores, mask, valid=None):
        if estimator == "rloo":
            return rloo_advantages(scores, groups, mask, valid=valid)
        return grpo_advantages(scores, groups, mask, std_norm=estimator == "grpo", valid=valid)

    scores, groups, mask = _random_groups(4)
    base = run(scores, mask)
    for garbage in (math.inf, -1e6, 123.0):
        dirty = scores.clone()
        dirty[[4, 10]] = garbage
        assert torch.equal(run(dirty, mask), base)
    # Marking a sample invalid via ``valid`` equals emptying its mask row (for the others),
    # and the invalid sample gets 0 even though its mask row has tokens.
    valid = mask.any(-1)
    valid[0] = False
    emptied = mask.clone()
    emptied[0] = False
    by_valid, by_mask = run(scores, mask, valid), run(scores, emptied)
    assert torch.equal(by_valid, by_mask)
    assert (by_valid[0] == 0).all()
    # Passing the default validity explicitly changes nothing.
    assert torch.equal(run(scores, mask, mask.any(-1)), base)


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_relabel_and_permutation_equivariance(estimator):
    fn = grpo_advantages if estimator == "grpo" else rloo_advantages
    scores, groups, mask = _random_groups(5)
    base = fn(scores, groups, mask)
    relabelled = groups * 1000 - 7  # another injective labelling (negative ids too)
    torch.testing.assert_close(fn(scores, relabelled, mask), base, rtol=0, atol=0)
    perm = torch.randperm(len(scores), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fn(scores[perm], groups[perm], mask[perm]), base[perm],
                               rtol=1e-12, atol=1e-12)


def test_row_length_changes_only_that_rows_broadcast():
    scores, groups, mask = _random_groups(6)
    base = grpo_advantages(scores, groups, mask)
    longer = mask.clone()
    longer[0] = True
    adv = grpo_advantages(scores, groups, longer)
    assert torch.equal(adv[1:], base[1:])
    assert (adv[0] == base[0, 0]).all()


def test_group_advantages_sum_to_zero_and_rloo_scales_dr_grpo():
    scores, groups, mask = _random_groups(7)
    valid = mask.any(-1)
    counts = group_counts(groups, valid).double()
    for adv in (grpo_advantages(scores, groups, mask), rloo_advantages(scores, groups, mask)):
        per_sample = adv[:, 0]
        for gid in groups.unique():
            members = (groups == gid) & valid
            assert per_sample[members].sum().abs() < 1e-12
    dr = grpo_advantages(scores, groups, mask, std_norm=False)[:, 0]
    rloo = rloo_advantages(scores, groups, mask)[:, 0]
    scale = torch.where(counts > 1, counts / (counts - 1).clamp(min=1), torch.zeros_like(counts))
    torch.testing.assert_close(rloo, dr * scale, rtol=1e-12, atol=1e-12)


def test_reinforce_pp_padding_and_invalid_rows_change_nothing():
    g = torch.Generator().manual_seed(8)
    rewards = torch.randn(4, 5, generator=g)
    mask = _mask([5, 2, 4, 3], 5)
    base_adv, base_ret = reinforce_pp_advantages(rewards, mask, gamma=0.95)
    for fill in (math.nan, math.inf, -1e4):
        dirty = torch.where(mask, rewards, torch.full_like(rewards, fill))
        adv, ret = reinforce_pp_advantages(dirty, mask, gamma=0.95)
        assert torch.equal(adv, base_adv) and torch.equal(ret, base_ret)
    # An invalid row (valid False, mask True) is the same as an empty row, whatever its rewards.
    valid = torch.tensor([True, True, True, False])
    wild = rewards.clone()
    wild[3] = 1e6
    emptied = mask.clone()
    emptied[3] = False
    by_valid = reinforce_pp_advantages(wild, mask, gamma=0.95, valid=valid)
    by_mask = reinforce_pp_advantages(rewards, emptied, gamma=0.95)
    assert all(torch.equal(a, b) for a, b in zip(by_valid, by_mask))
    assert (by_valid[0][3] == 0).all() and (by_valid[1][3] == 0).all()


def test_dtypes_and_inputs_not_mutated():
    scores, groups, mask = SCORES.clone(), GROUPS.clone(), MASK.clone()
    assert grpo_advantages(scores.bfloat16(), groups, mask).dtype == torch.float32
    assert rloo_advantages(scores.double(), groups.int(), mask).dtype == torch.float64
    assert group_baseline_scores(scores.half(), groups).dtype == torch.float32
    assert torch.equal(scores, SCORES) and torch.equal(groups, GROUPS) and torch.equal(mask, MASK)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="integer"):
        grpo_advantages(SCORES, GROUPS.float(), MASK)
    with pytest.raises(ValueError, match="groups must have shape"):
        rloo_advantages(SCORES, GROUPS[:5], MASK)
    with pytest.raises(ValueError, match="mask must be a bool"):
        grpo_advantages(SCORES, GROUPS, MASK.float())
    with pytest.raises(ValueError, match="valid must be a bool"):
        grpo_advantages(SCORES, GROUPS, MASK, valid=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="scores must be 1-D"):
        group_baseline_scores(SCORES[None], GROUPS)
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(SCORES, GROUPS, MASK, eps=0.0)
    with pytest.raises(ValueError, match="gamma"):
        reinforce_pp_advantages(torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool), gamma=1.5)
    with pytest.raises(ValueError, match="groups must have shape"):
        group_counts(GROUPS[None])


# ---- the estimator table: one hand-computed case per entry ---------------------------------------

# Scores [1, 3, 2, 6] in groups [0, 0, 1, 1], R = 2 tokens each (all valid), no KL, values 0,
# gamma 1, lam 0.5, no whitening for gae. Per-token rewards are [0, s] (the score at the last token).
TABLE_SCORES = [1.0, 3.0, 2.0, 6.0]
C_PP = [-2.0, 0.0, -1.0, 3.0]  # scores minus the batch mean 3; over 8 tokens the unbiased var is 28 / 7 = 4
C_BASE = [-1.0, 1.0, -2.0, 2.0]  # scores minus their group's mean; var 20 / 7 over 8 tokens (mean 0)
TABLE_EXPECTED = {  # (B, R) advantages
    # GAE: A_1 = delta_1 = s, A_0 = delta_0 + gamma * lam * A_1 = 0 + 0.5 s; returns = A (values 0).
    "gae": [[0.5 * s, s] for s in TABLE_SCORES],
    # GRPO: group 0 mean 2, std sqrt(2); group 1 mean 4, std sqrt(8): +-1/sqrt(2) each.
    "grpo": [[v * SQRT_HALF] * 2 for v in (-1.0, 1.0, -1.0, 1.0)],
    # RLOO: s_i minus the other sample of its group.
    "rloo": [[v] * 2 for v in (-2.0, 2.0, -4.0, 4.0)],
    # REINFORCE++: both tokens' return is s, whitened over the 8 tokens: (s - 3) / 2.
    "reinforce_pp": [[c / 2.0] * 2 for c in C_PP],
    # REINFORCE++-baseline: the same on the group-centred scores.
    "reinforce_pp_baseline": [[c / math.sqrt(20 / 7)] * 2 for c in C_BASE],
}


def test_every_table_entry_has_a_hand_computed_case():
    assert set(TABLE_EXPECTED) == set(ESTIMATORS)


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_table_entry_hand_values(name):
    entry = ESTIMATORS[name]
    x = AdvantageInputs(scores=torch.tensor(TABLE_SCORES), kl=torch.zeros(4, 2), reward_kl_coef=0.1,
                        values=torch.zeros(4, 2) if entry.uses_critic else None, groups=torch.tensor([0, 0, 1, 1]),
                        mask=torch.ones(4, 2, dtype=torch.bool), valid=torch.ones(4, dtype=torch.bool),
                        gamma=1.0, lam=0.5, whiten=False, group_std_norm=True)
    out = entry.compute(x)
    torch.testing.assert_close(out.advantages, torch.tensor(TABLE_EXPECTED[name]), rtol=1e-5, atol=1e-5)
    expected_returns = TABLE_EXPECTED[name] if entry.uses_critic else [[0.0, 0.0]] * 4
    torch.testing.assert_close(out.returns, torch.tensor(expected_returns))
    assert all(math.isfinite(float(v)) for v in out.metrics.values())


def test_gae_entry_needs_values():
    x = AdvantageInputs(torch.zeros(2), torch.zeros(2, 3), 0.0, None, torch.zeros(2, dtype=torch.long),
                        torch.ones(2, 3, dtype=torch.bool), torch.ones(2, dtype=torch.bool), 1.0, 1.0, True, True)
    with pytest.raises(ValueError, match="gae needs the old values"):
        ESTIMATORS["gae"].compute(x)


# ---- decoupled and length-adaptive lambda, value diagnostics ------------------


def _gae_inputs(**kw) -> AdvantageInputs:
    # one response of 2 tokens, score 1 at the last; values .5, .5; gamma 1
    base = dict(scores=torch.tensor([1.0]), kl=torch.zeros(1, 2), reward_kl_coef=0.0,
                values=torch.tensor([[0.5, 0.5]]), groups=torch.tensor([0]), mask=torch.ones(1, 2, dtype=torch.bool),
                valid=torch.ones(1, dtype=torch.bool), gamma=1.0, lam=0.0, whiten=False, group_std_norm=True)
    return AdvantageInputs(**{**base, **kw})


def test_lam_critic_sets_the_value_targets_and_lam_the_advantages():
    # lam 0: A = (0 + .5 - .5, 1 - .5) = (0, .5); lam_critic 1: G = Monte-Carlo return (1, 1)
    out = ESTIMATORS["gae"].compute(_gae_inputs(lam_critic=1.0))
    torch.testing.assert_close(out.advantages, torch.tensor([[0.0, 0.5]]))
    torch.testing.assert_close(out.returns, torch.tensor([[1.0, 1.0]]))
    coupled = ESTIMATORS["gae"].compute(_gae_inputs())  # lam_critic unset: TD(0) targets (.5, 1)
    torch.testing.assert_close(coupled.returns, torch.tensor([[0.5, 1.0]]))


def test_adaptive_lambda_replaces_lam_for_the_advantages_only():
    # length 2, alpha 1: lambda = 1 - 1/2 = .5: A_1 = .5, A_0 = 0 + .5 x .5 = .25; targets keep lam 0
    out = ESTIMATORS["gae"].compute(_gae_inputs(lam_adaptive_alpha=1.0))
    torch.testing.assert_close(out.advantages, torch.tensor([[0.25, 0.5]]))
    torch.testing.assert_close(out.returns, torch.tensor([[0.5, 1.0]]))
    assert float(out.metrics["lam_actor_mean"]) == pytest.approx(0.5)


def test_gae_logs_value_diagnostics():
    x = _gae_inputs(scores=torch.tensor([1.0, 0.0]), kl=torch.zeros(2, 2), values=torch.tensor([[0.8, 0.9], [0.1, 0.2]]),
                    groups=torch.tensor([0, 1]), mask=torch.ones(2, 2, dtype=torch.bool),
                    valid=torch.ones(2, dtype=torch.bool), lam=1.0)
    m = ESTIMATORS["gae"].compute(x).metrics
    assert float(m["value_first_token_mean"]) == pytest.approx(0.45)  # (.8 + .1) / 2
    assert float(m["return_first_token_mean"]) == pytest.approx(0.5)  # lam 1, gamma 1: the scores 1 and 0
    assert 0.9 < float(m["value_return_corr"]) <= 1.0  # high values where the return is 1
