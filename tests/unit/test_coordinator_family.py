"""The PPO family in the coordinator (estimators, KL in the loss, dynamic sampling, off-policy
correction, overlong penalty), driven with the loop tests' in-process fakes. No Ray."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.runtime.pending import Done
from tests.unit.test_coordinator import FakeLearners, FakeReward, FakeRollout, _config, _coordinator

P, N = 2, 3  # prompts per iteration, samples per prompt: groups (0, 0, 0) and (1, 1, 1)


def _family(ppo: dict, **sections):
    return _config(ppo={"mini_batches": 1, **ppo},
                   rollout={"prompts_per_iteration": P, "samples_per_prompt": N, "max_new_tokens": 5,
                            "num_engines": 1}, **sections)


def _update(learners: FakeLearners):
    (update, _), = learners.train_calls
    return update


def test_grpo_sends_group_normalised_outcomes_and_no_value_work():
    # Scores by sample: group 0 gets [1, 0, 2] (mean 1, std 1), group 1 gets [3, 3, 0] (mean 2, std sqrt(3)).
    learners = FakeLearners(value=0.7)
    coord = _coordinator(_family({"estimator": "grpo", "kl_coef": 0.0}), learners=learners,
                         reward=FakeReward([1.0, 0.0, 2.0, 3.0, 3.0, 0.0]))
    m = coord.step()
    update = _update(learners)
    first_token = update.advantages[:, 0].tolist()
    expected = [0.0, -1.0, 1.0, 1 / math.sqrt(3), 1 / math.sqrt(3), -2 / math.sqrt(3)]
    assert first_token == pytest.approx(expected, abs=1e-4)
    mask = update.response_mask
    assert torch.equal(update.advantages[~mask], torch.zeros(int((~mask).sum())))
    assert torch.equal(update.returns, torch.zeros_like(update.returns))  # no value targets
    for key in ("value_mean", "explained_variance", "return_mean"):
        assert key not in m  # no value metrics pretending to mean something


def test_dr_grpo_and_rloo_hand_values():
    scores = [1.0, 0.0, 2.0, 3.0, 3.0, 0.0]
    learners = FakeLearners()
    _coordinator(_family({"estimator": "grpo", "group_std_norm": False, "kl_coef": 0.0}), learners=learners,
                 reward=FakeReward(scores)).step()
    assert _update(learners).advantages[:, 0].tolist() == pytest.approx([0, -1, 1, 1, 1, -2], abs=1e-6)
    learners = FakeLearners()
    _coordinator(_family({"estimator": "rloo", "kl_coef": 0.0}), learners=learners, reward=FakeReward(scores)).step()
    # leave-one-out: 1 - mean(0, 2) = 0, 0 - 1.5, 2 - 0.5; 3 - 1.5, 3 - 1.5, 0 - 3
    assert _update(learners).advantages[:, 0].tolist() == pytest.approx([0, -1.5, 1.5, 1.5, 1.5, -3], abs=1e-6)


def test_kl_in_the_loss_sends_reference_logprobs_and_leaves_the_reward_alone():
    learners = FakeLearners()
    cfg = _family({"estimator": "rloo", "kl_in": "loss", "kl_estimator": "k3", "kl_coef": 0.3})
    m = _coordinator(cfg, learners=learners, reward=FakeReward([1.0, 0.0, 2.0, 3.0, 3.0, 0.0])).step()
    update = _update(learners)
    assert update.kl_coef == pytest.approx(0.3) == m["kl_coef"]
    assert update.ref_logprobs is not None and update.ref_logprobs.shape == update.advantages.shape
    # The same advantages as without any KL: the penalty is the learner's loss term now.
    assert update.advantages[:, 0].tolist() == pytest.approx([0, -1.5, 1.5, 1.5, 1.5, -3], abs=1e-6)


def test_kl_in_the_reward_reaches_the_group_outcome():
    learners = FakeLearners()  # old logprobs = rollout logprobs; the fake reference is 0.5 lower per token
    _coordinator(_family({"estimator": "rloo", "kl_coef": 0.1}), learners=learners,
                 reward=FakeReward([0.0] * 6)).step()
    update = _update(learners)
    assert update.ref_logprobs is None and update.kl_coef == 0.0
    # outcome = -0.1 * 0.5 * length; lengths cycle 5, 2, 5 -> group 0: [-.25, -.1, -.25]
    assert update.advantages[:3, 0].tolist() == pytest.approx([-0.25 + 0.175, -0.1 + 0.25, -0.25 + 0.175], abs=1e-5)


def test_dynamic_sampling_drops_uniform_groups_and_generates_more():
    class RoundRewards(FakeReward):
        """Round 1: group 0 uniform, group 1 varied. Round 2: both varied."""

        def __init__(self):
            super().__init__()
            self.rounds = [[1.0, 1.0, 1.0, 0.0, 1.0, 2.0], [5.0, 6.0, 7.0, 1.0, 1.0, 1.0]]

        def score(self, batch_ref):
            self.calls.append(batch_ref)
            return Done(torch.tensor(self.rounds[min(len(self.calls), 2) - 1]))

    rollout, learners, reward = FakeRollout(), FakeLearners(), RoundRewards()
    coord = _coordinator(_family({"estimator": "grpo", "dynamic_sampling": True, "kl_coef": 0.0}),
                         rollout=rollout, learners=learners, reward=reward)
    m = coord.step()
    assert len(rollout.calls) == 2 and m["dynamic/extra_generations"] == 1.0
    assert m["dynamic/dropped_groups"] == 2.0 and m["dynamic/filled_groups"] == 0.0
    assert len(reward.calls) == 2  # scored once per round, not again in the score phase
    update = _update(learners)
    assert update.advantages.shape[0] == P * N
    # kept: round 1's group 1 ([0, 1, 2]) then round 2's group 0 ([5, 6, 7]): both normalise to [-1, 0, 1]
    assert update.advantages[:, 0].tolist() == pytest.approx([-1, 0, 1, -1, 0, 1], abs=1e-4)


def test_dynamic_sampling_fills_a_short_batch_with_dropped_groups():
    learners, rollout = FakeLearners(), FakeRollout()
    coord = _coordinator(_family({"estimator": "grpo", "dynamic_sampling": True, "max_extra_generations": 1}),
                         rollout=rollout, learners=learners, reward=FakeReward([2.0]))  # always uniform
    m = coord.step()
    assert len(rollout.calls) == 2 and m["dynamic/filled_groups"] == 2.0
    assert _update(learners).advantages.shape[0] == P * N


def test_rollout_correction_asks_the_engines_for_logprobs_every_iteration():
    rollout = FakeRollout()
    coord = _coordinator(_family({"rollout_correction": "tis"}, sync={"check_logprobs_every": 0}), rollout=rollout)
    coord.step()
    coord.step()
    assert [spec.logprobs for _, spec in rollout.calls] == [True, True]


def test_overlong_penalty_lowers_the_scores_of_long_responses():
    # max_new_tokens 5, buffer 2: lengths 5 (at the limit) lose the full penalty 1.0; length 2 loses nothing.
    learners = FakeLearners()
    m = _coordinator(_family({"estimator": "rloo", "kl_coef": 0.0, "overlong_buffer": 2}), learners=learners,
                     reward=FakeReward([0.0])).step()
    # group 0 outcomes: [-1, 0, -1] -> leave-one-out [-1 + .5, 0 + 1, -1 + .5]
    assert _update(learners).advantages[:3, 0].tolist() == pytest.approx([-0.5, 1.0, -0.5], abs=1e-6)
    assert m["shaped_reward_mean"] == pytest.approx(-4 / 6)
