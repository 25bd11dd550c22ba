"""The PPO loop's control flow, driven by in-process fakes of every role (no Ray started).

Each iteration samples B=3 prompts with one response each, R=5 (max_new_tokens), so B != R.
The fake rollout's responses follow a fixed pattern with random tokens:

    sample 0: 5 tokens, no EOS, finish "length"   -> truncated
    sample 1: 2 tokens ending in EOS, finish "stop"
    sample 2: 5 tokens ending in EOS, finish "length" -> not truncated (EOS at the limit)
"""

import dataclasses
import math
import time

import pytest
import torch

from rlhf_ray.batch import ExperienceBatch, Generation, TrainUpdate
from rlhf_ray.config import Config, config_from_dict
from rlhf_ray.coordinator.loop import NonFiniteError, PPOCoordinator
from rlhf_ray.data.prompts import PromptSampler, PromptSet
from rlhf_ray.runtime.pending import Done, RemoteCallError

PAD, EOS, VOCAB = 0, 2, 50
B, R = 3, 5
LENGTHS = [5, 2, 5]
PHASES = ("generate", "score", "advantages", "update", "sync")


def _config(ppo: dict | None = None, reward: dict | None = None, **sections) -> Config:
    return config_from_dict({
        "seed": 3,
        "rollout": {"prompts_per_iteration": B, "samples_per_prompt": 1, "max_new_tokens": R, "num_engines": 1},
        "ppo": {"mini_batches": 1, **(ppo or {})},
        "learner": {"num_ranks": 1, "micro_batch_size": 3},
        "reward": reward or {},
        **sections,
    })


def _prompts(n: int = 7) -> PromptSet:
    ids = [[10 + i] * (1 + i % 3) for i in range(n)]  # lengths 1, 2, 3, 1, ...
    return PromptSet(texts=[f"prompt {i}" for i in range(n)], token_ids=ids, dropped=0, truncated=0)


class FakeRollout:
    def __init__(self, seed: int = 0) -> None:
        self.gen = torch.Generator().manual_seed(seed)
        self.calls: list[tuple[list[list[int]], object]] = []

    def generate(self, prompt_ids, spec):
        self.calls.append((prompt_ids, spec))
        out = Generation([], [], [], [], [])
        j = 0
        for i, p in enumerate(prompt_ids):
            for _ in range(spec.n):
                length = min(LENGTHS[j % 3], spec.max_new_tokens)
                tokens = torch.randint(3, VOCAB, (length,), generator=self.gen).tolist()
                if j % 3 in (1, 2):
                    tokens[-1] = EOS
                out.prompt_ids.append(list(p))
                out.response_ids.append(tokens)
                out.logprobs.append((-3 * torch.rand(length, generator=self.gen)).tolist())
                out.finish_reasons.append("stop" if j % 3 == 1 else "length")
                out.prompt_index.append(i)
                j += 1
        return Done(out)


class FakeReference:
    """Reference logprobs = rollout logprobs - gap on real tokens (so k1 KL = gap per token)."""

    def __init__(self, gap: float = 0.5) -> None:
        self.gap = gap
        self.calls: list[tuple[object, float]] = []

    def logprobs(self, batch_ref, temperature):
        self.calls.append((batch_ref, temperature))
        batch = batch_ref[1]  # see _put
        return Done(torch.where(batch.response_mask, batch.rollout_logprobs - self.gap, 0.0))


class FakeReward:
    def __init__(self, scores=(1.0, -2.0, 0.5)) -> None:
        self.scores = list(scores)
        self.calls: list[object] = []

    def score(self, batch_ref):
        self.calls.append(batch_ref)
        batch = batch_ref[1]
        return Done(torch.tensor([self.scores[i % len(self.scores)] for i in range(len(batch))]))


class FakeLearners:
    """Old logprobs = rollout logprobs + offset (0: the learner agrees with the engine); values = value."""

    def __init__(self, offset: float = 0.0, value: float = 0.0, train_seconds: float = 0.0) -> None:
        self.offset, self.value, self.train_seconds = offset, value, train_seconds
        self.old_calls: list[ExperienceBatch] = []
        self.train_calls: list[tuple[ExperienceBatch, int]] = []

    def compute_old(self, batch):
        self.old_calls.append(batch)
        return Done((batch.rollout_logprobs + self.offset, torch.full(batch.response_mask.shape, self.value)))

    def train(self, batch, iteration):
        self.train_calls.append((batch, iteration))
        time.sleep(self.train_seconds)
        return Done({"policy_loss": 0.25, "value_loss": 0.5})


class FakeSync:
    def __init__(self) -> None:
        self.calls = 0

    def sync(self):
        self.calls += 1
        return {"sync_bytes": 1024.0}


def _put(batch):
    """Stands in for ray.put: reference and reward must get exactly what it returned."""
    return ("ref", batch)


def _coordinator(cfg: Config | None = None, prompts: PromptSet | None = None, **fakes) -> PPOCoordinator:
    roles = dict(rollout=FakeRollout(), reference=FakeReference(), reward=FakeReward(), learners=FakeLearners(),
                 weight_sync=FakeSync())
    roles.update(fakes)
    return PPOCoordinator(cfg or _config(), prompts or _prompts(), PAD, [EOS], put=_put, **roles)


# ---- one step ---------------------------------------------------------------------------


def test_step_returns_metrics_with_phase_timings():
    coord = _coordinator(learners=FakeLearners(train_seconds=0.02))
    m = coord.step()
    for phase in PHASES:
        assert m[f"time/{phase}"] >= 0.0
    assert m["time/update"] >= 0.02  # the learner's time is booked under update
    assert m["time/iteration"] >= sum(m[f"time/{p}"] for p in PHASES)
    assert m["iteration"] == 0
    assert m["policy_loss"] == 0.25 and m["value_loss"] == 0.5  # learner metrics pass through
    # The update of step k is synced at the start of step k+1 (before its generation).
    assert "sync_bytes" not in m
    assert coord.step()["sync_bytes"] == 1024.0
    numbers = {k: v for k, v in m.items() if isinstance(v, (int, float))}
    assert all(math.isfinite(v) for v in numbers.values()), numbers


def test_batch_metrics_hand_values():
    m = _coordinator().step()
    assert m["samples"] == 3.0
    assert m["response_tokens"] == 12.0  # 5 + 2 + 5
    assert m["response_length"] == pytest.approx(4.0)
    assert m["truncation_rate"] == pytest.approx(1 / 3)  # only sample 0
    assert m["reward_mean"] == pytest.approx(-0.5 / 3)  # scores 1, -2, 0.5
    assert m["reward_std"] == pytest.approx(torch.tensor([1.0, -2.0, 0.5]).std().item())
    assert m["tokens_per_second"] == pytest.approx(12.0 / m["time/iteration"])
    assert m["kl_coef"] == pytest.approx(0.02)
    assert m["kl_mean"] == pytest.approx(0.5 * 4.0)  # k1 = 0.5 per token, 4 tokens per sequence on average
    assert m["kl_k2_mean"] == pytest.approx(0.5 * 0.5**2 * 4.0)  # k2 = 0.5 * 0.5^2 per token


def test_iteration_increments_and_reaches_the_learner():
    learners, sync = FakeLearners(), FakeSync()
    coord = _coordinator(learners=learners, weight_sync=sync)
    assert [coord.step()["iteration"] for _ in range(3)] == [0, 1, 2]
    assert coord.iteration == 3
    assert [it for _, it in learners.train_calls] == [0, 1, 2]
    assert sync.calls == 2  # before steps 1 and 2; the last update is synced by the next step
    coord.step()
    assert sync.calls == 3


def test_roles_get_the_sampled_prompts_and_the_shared_batch():
    cfg, prompts = _config(), _prompts()
    rollout, reference, reward, learners = FakeRollout(), FakeReference(), FakeReward(), FakeLearners()
    coord = _coordinator(cfg, prompts, rollout=rollout, reference=reference, reward=reward, learners=learners)
    m = coord.step()
    expected_idx = PromptSampler(7, cfg.seed, cfg.data.shuffle).next(B)
    prompt_ids, spec = rollout.calls[0]
    assert coord.state_dict()["sampler"]["position"] == B
    assert prompt_ids == [prompts.token_ids[i] for i in expected_idx]
    assert m["prompt_indices"] == expected_idx
    assert (spec.n, spec.max_new_tokens, spec.temperature) == (1, R, 1.0)
    # reference and reward receive the one object put() returned, not a copy each
    (ref_arg, temperature), = reference.calls
    assert reward.calls == [ref_arg] and ref_arg[0] == "ref"
    assert temperature == cfg.rollout.temperature
    # the learners' no-grad pass sees the packed batch itself
    assert learners.old_calls[0] is ref_arg[1]
    assert learners.old_calls[0].response_mask.shape == (B, R)


def test_sampler_advances_by_prompts_per_iteration():
    coord = _coordinator(prompts=_prompts(7))
    states = []
    for _ in range(3):
        coord.step()
        states.append((coord.sampler.state_dict()["epoch"], coord.sampler.state_dict()["position"]))
    assert states == [(0, 3), (0, 6), (1, 2)]  # the third step takes 1 prompt of epoch 0 and 2 of epoch 1


def test_train_batch_has_advantages_and_returns_zero_at_masked_positions():
    learners = FakeLearners(value=0.3)
    _coordinator(learners=learners).step()
    (batch, _), = learners.train_calls
    mask = batch.response_mask
    assert mask.sum(-1).tolist() == LENGTHS
    # Only what the advantages phase made travels to the ranks: they kept the rest from compute_old.
    assert isinstance(batch, TrainUpdate)
    assert sorted(f.name for f in dataclasses.fields(batch)) == ["advantages", "kl_coef", "ref_logprobs",
                                                                 "response_mask", "returns", "value_only"]
    assert batch.ref_logprobs is None and batch.kl_coef == 0.0  # KL in the reward: nothing more travels
    assert batch.value_only is False  # no critic warm-up: a full PPO update
    assert learners.old_calls[0].response_mask.shape == (B, R)
    assert batch.advantages.shape == batch.returns.shape == (B, R)
    assert (batch.advantages[~mask] == 0).all()
    assert (batch.returns[~mask] == 0).all()
    assert batch.advantages[mask].abs().sum() > 0
    # whitened over the valid tokens (the default)
    assert batch.advantages[mask].mean().item() == pytest.approx(0.0, abs=1e-6)
    assert batch.advantages[mask].std().item() == pytest.approx(1.0, abs=1e-4)
    assert learners.old_calls[0].truncated.tolist() == [True, False, False]


def test_advantages_hand_values_without_kl_discount_or_whitening():
    # kl_coef 0, gamma = lam = 1, zero values: every valid token's advantage and return is the score.
    cfg = _config(ppo={"kl_coef": 0.0, "gamma": 1.0, "lam": 1.0, "whiten_advantages": False})
    learners = FakeLearners(value=0.0)
    m = _coordinator(cfg, learners=learners).step()
    (batch, _), = learners.train_calls
    expected = torch.tensor([
        [1.0, 1.0, 1.0, 1.0, 1.0],
        [-2.0, -2.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.5, 0.5, 0.5],
    ])
    torch.testing.assert_close(batch.advantages, expected)
    torch.testing.assert_close(batch.returns, expected)
    assert m["advantage_mean_raw"] == pytest.approx((5 * 1.0 - 2 * 2.0 + 5 * 0.5) / 12)


def test_advantages_hand_values_with_kl_penalty():
    # k1 KL = 0.5 per token, coefficient 0.1: each token pays 0.05; gamma = lam = 1, values 0.
    cfg = _config(ppo={"kl_coef": 0.1, "gamma": 1.0, "lam": 1.0, "whiten_advantages": False})
    learners = FakeLearners()
    m = _coordinator(cfg, learners=learners).step()
    (batch, _), = learners.train_calls
    # A_t = score - 0.05 * (tokens from t to the end)
    expected = torch.tensor([
        [0.75, 0.80, 0.85, 0.90, 0.95],
        [-2.10, -2.05, 0.0, 0.0, 0.0],
        [0.25, 0.30, 0.35, 0.40, 0.45],
    ])
    torch.testing.assert_close(batch.advantages, expected)
    assert m["shaped_reward_mean"] == pytest.approx((0.75 - 2.10 + 0.25) / 3)


# ---- rollout/learner agreement ------------------------------------------------------------


def test_logprob_mismatch_is_zero_when_learner_agrees_with_the_engine():
    m = _coordinator(learners=FakeLearners(offset=0.0)).step()
    assert m["logprob_mismatch_mean"] == pytest.approx(0.0, abs=1e-7)
    assert m["logprob_mismatch_max"] == pytest.approx(0.0, abs=1e-7)


def test_logprob_mismatch_measures_the_gap_on_real_tokens_only():
    m = _coordinator(learners=FakeLearners(offset=0.25)).step()  # padding differs too, and must not count
    assert m["logprob_mismatch_mean"] == pytest.approx(0.25, abs=1e-6)
    assert m["logprob_mismatch_max"] == pytest.approx(0.25, abs=1e-6)


def test_max_logprob_mismatch_fails_the_step():
    cfg = _config(sync={"max_logprob_mismatch": 0.1})
    coord = _coordinator(cfg, learners=FakeLearners(offset=0.25))
    with pytest.raises(Exception, match="max_logprob_mismatch"):
        coord.step()


@pytest.mark.parametrize("async_generation", [False, True])
def test_engines_return_logprobs_only_on_check_iterations(async_generation):
    # correction off explicitly: with async generation it is on by default and needs logprobs every time
    cfg = _config(ppo={"mini_batches": 1, "rollout_correction": "none"}, sync={"check_logprobs_every": 3}, rollout={
        "prompts_per_iteration": B, "samples_per_prompt": 1, "max_new_tokens": R, "num_engines": 1,
        "async_generation": async_generation})
    rollout = FakeRollout()
    coord = _coordinator(cfg, rollout=rollout, learners=FakeLearners(offset=0.25))
    rows = [coord.step() for _ in range(7)]
    coord.close()
    # Generation k (async: requested during step k-1) asks for logprobs iff k % 3 == 0.
    assert [spec.logprobs for _, spec in rollout.calls[:7]] == [True, False, False, True, False, False, True]
    for k, row in enumerate(rows):
        assert ("logprob_mismatch_mean" in row) == (k % 3 == 0), (k, sorted(row))
        if k % 3 == 0:
            assert row["logprob_mismatch_mean"] == pytest.approx(0.25, abs=1e-6)
    never = _coordinator(_config(sync={"check_logprobs_every": 0}), rollout=FakeRollout())
    assert "logprob_mismatch_mean" not in never.step()


def test_async_generation_corrects_by_default_so_the_engines_return_logprobs_every_iteration():
    cfg = _config(sync={"check_logprobs_every": 0}, rollout={
        "prompts_per_iteration": B, "samples_per_prompt": 1, "max_new_tokens": R, "num_engines": 1,
        "async_generation": True})
    assert cfg.ppo.rollout_correction == "tis"
    rollout = FakeRollout()
    coord = _coordinator(cfg, rollout=rollout)
    for _ in range(3):
        coord.step()
    coord.close()
    assert all(spec.logprobs for _, spec in rollout.calls) and len(rollout.calls) >= 3  # and those ahead


def test_negative_check_interval_is_a_config_error():
    from rlhf_ray.config import ConfigError, validate

    with pytest.raises(ConfigError, match="check_logprobs_every"):
        validate(_config(sync={"check_logprobs_every": -1}))


# ---- non-finite inputs --------------------------------------------------------------------


class NaNReward(FakeReward):
    def score(self, batch_ref):
        scores = super().score(batch_ref).result()
        scores[1] = float("nan")
        return Done(scores)


class InfValueLearners(FakeLearners):
    def compute_old(self, batch):
        old, values = super().compute_old(batch).result()
        values[0, 0] = float("inf")
        return Done((old, values))


@pytest.mark.parametrize("fakes, bad_row", [
    ({"reward": NaNReward()}, 1),
    ({"learners": InfValueLearners()}, 0),
])
def test_non_finite_samples_are_quarantined(fakes, bad_row):
    learners = fakes.get("learners", FakeLearners())
    coord = _coordinator(**{**fakes, "learners": learners})
    m = coord.step()
    assert m["skipped_samples"] == 1.0
    (batch, _), = learners.train_calls
    assert not batch.response_mask[bad_row].any()  # contributes no token to any loss
    assert (batch.advantages[bad_row] == 0).all() and (batch.returns[bad_row] == 0).all()
    assert torch.isfinite(batch.advantages).all() and torch.isfinite(batch.returns).all()
    good = [i for i in range(batch.advantages.shape[0]) if i != bad_row]
    assert batch.response_mask[good].any(-1).all()


def test_quarantined_scores_do_not_enter_the_running_score_moments():
    # Scores (1, NaN, .5) each iteration: the NaN sample is quarantined (its score a stand-in 0),
    # and only 1 and .5 update the moments: count 2, mean .75, sample std sqrt(.125).
    coord = _coordinator(_config(reward={"normalize": True}), reward=NaNReward())
    m = coord.step()
    assert m["skipped_samples"] == 1.0
    moments = coord.score_moments
    assert (moments.count, moments.mean) == (2, pytest.approx(0.75))
    assert moments.std == pytest.approx(math.sqrt(0.125))
    coord.step()
    assert (moments.count, moments.mean) == (4, pytest.approx(0.75))


class AllNaNReward(FakeReward):
    def score(self, batch_ref):
        return Done(torch.full_like(super().score(batch_ref).result(), float("nan")))


def test_all_bad_iterations_are_skipped_then_stop():
    learners, sync = FakeLearners(), FakeSync()
    coord = _coordinator(_config(ppo={"max_bad_iterations": 2}), reward=AllNaNReward(), learners=learners,
                         weight_sync=sync)
    m = coord.step()
    assert m["skipped_update"] == 1.0 and m["skipped_samples"] == 3.0
    assert learners.train_calls == []  # nothing to train on: no update, nothing to sync
    with pytest.raises(NonFiniteError, match="2 consecutive iterations had no usable sample"):
        coord.step()
    assert coord.iteration == 1 and sync.calls == 0


# ---- checkpoint state --------------------------------------------------------------------


def test_adaptive_kl_coefficient_hand_values():
    # KL per sequence = 0.5 * 4 = 2.0 >> target 0.01: err clips to 0.2; value *= 1 + 0.2 * 3 / 10.
    cfg = _config(ppo={"kl_target": 0.01, "kl_horizon": 10})
    coord = _coordinator(cfg)
    first, second = coord.step(), coord.step()
    assert first["kl_coef"] == pytest.approx(0.02)  # the coefficient used in that iteration
    assert second["kl_coef"] == pytest.approx(0.02 * 1.06)
    assert coord.kl_ctl.value == pytest.approx(0.02 * 1.06 ** 2)


def test_state_dict_round_trip_resumes_where_it_left_off():
    cfg = _config(ppo={"kl_target": 0.01, "kl_horizon": 10}, reward={"normalize": True})
    original = _coordinator(cfg)
    original.step()
    original.step()
    state = original.state_dict()
    assert state["iteration"] == 2
    assert state["kl_ctl"] == {"value": pytest.approx(0.02 * 1.06 ** 2)}
    assert state["sampler"] == {"epoch": 0, "position": 6, "size": 7, "seed": 3}
    assert state["score_moments"]["count"] == 6

    resumed_rollout, resumed_learners = FakeRollout(), FakeLearners()
    resumed = _coordinator(cfg, rollout=resumed_rollout, learners=resumed_learners)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    assert resumed.kl_ctl.value == original.kl_ctl.value

    a, b = original.step(), resumed.step()
    assert resumed_rollout.calls[-1][0] == original.rollout.calls[-1][0]  # same next prompts
    assert (a["iteration"], a["kl_coef"]) == (b["iteration"], b["kl_coef"]) == (2, pytest.approx(0.02 * 1.06 ** 2))
    assert resumed.state_dict()["sampler"] == original.state_dict()["sampler"]
    # Scores are normalised with the restored running moments, so the update sees the same advantages
    # (the fakes' KL and scores do not depend on the random tokens).
    torch.testing.assert_close(resumed_learners.train_calls[-1][0].advantages,
                               original.learners.train_calls[-1][0].advantages)
    fresh_learners = FakeLearners()
    fresh = _coordinator(cfg, learners=fresh_learners)
    fresh.sampler.load_state_dict(state["sampler"])  # same prompts, but no moments and a fresh KL coefficient
    fresh.step()
    assert not torch.allclose(fresh_learners.train_calls[-1][0].advantages,
                              original.learners.train_calls[-1][0].advantages)


def test_fixed_kl_controller_state():
    coord = _coordinator(_config(ppo={"kl_coef": 0.07}))
    coord.step()
    assert coord.state_dict()["kl_ctl"] == {"value": 0.07}  # fixed: never moves


# ---- async generation (one step off-policy) ------------------------------------------------


class LearnersFailingOnce(FakeLearners):
    """The update of iteration ``at`` fails once, as if the learner died."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.failed = at, False

    def train(self, batch, iteration):
        if iteration == self.at and not self.failed:
            self.failed = True
            raise RemoteCallError("learner died", "died", ("learner", 0), "PPO update")
        return super().train(batch, iteration)


def test_async_rollback_regenerates_the_pending_prompts():
    rollout, learners = FakeRollout(), LearnersFailingOnce(at=1)
    cfg = _config(rollout={"prompts_per_iteration": B, "samples_per_prompt": 1, "max_new_tokens": R,
                           "num_engines": 1, "async_generation": True})
    coord = _coordinator(cfg, rollout=rollout, learners=learners)
    coord.step()
    with pytest.raises(RemoteCallError):
        coord.step()
    fresh = PromptSampler(7, seed=3)
    drawn = [fresh.next(B) for _ in range(2)]
    assert coord.iteration == 1 and coord.pending_prompts[0] == drawn[1]  # rolled back
    m = coord.step()  # regenerates the same prompts, trains on them
    coord.close()
    assert m["prompt_indices"] == drawn[1] and coord.iteration == 2


# ---- held-out evaluation -----------------------------------------------------------------


def _eval_prompts(n: int = 4) -> PromptSet:
    return PromptSet(texts=[f"held {i}" for i in range(n)], token_ids=[[40 + i, 41] for i in range(n)], dropped=0,
                     truncated=0)


def test_evaluate_hand_values_and_sampling_settings():
    rollout = FakeRollout()
    coord = _coordinator(_config(eval={"every": 2}), rollout=rollout, eval_prompts=_eval_prompts())
    m, batch = coord.evaluate()
    prompt_ids, spec = rollout.calls[0]
    assert prompt_ids == _eval_prompts().token_ids  # every evaluation prompt, in order
    assert (spec.n, spec.temperature, spec.max_new_tokens, spec.logprobs) == (1, 0.0, R, False)
    # responses: 5 tokens no EOS (truncated), 2 with EOS, 5 ending in EOS, 5 no EOS (truncated)
    # scores cycle 1, -2, 0.5: [1, -2, 0.5, 1]
    assert m["iteration"] == 0 and m["eval/samples"] == 4.0
    assert m["eval/reward_mean"] == pytest.approx(0.125)
    assert m["eval/reward_std"] == pytest.approx(torch.tensor([1.0, -2.0, 0.5, 1.0]).std().item())
    assert m["eval/response_length"] == pytest.approx(17 / 4)
    assert m["eval/truncation_rate"] == pytest.approx(0.5)
    assert m["eval/nonfinite_scores"] == 0.0 and m["time/eval"] >= 0.0
    assert batch.scores.tolist() == [1.0, -2.0, 0.5, 1.0]


def test_evaluate_uses_its_own_length_and_temperature():
    rollout = FakeRollout()
    cfg = _config(eval={"every": 1, "max_new_tokens": 3, "temperature": 0.7, "samples_per_prompt": 2})
    m, _ = _coordinator(cfg, rollout=rollout, eval_prompts=_eval_prompts(2)).evaluate()
    _, spec = rollout.calls[0]
    assert (spec.n, spec.temperature, spec.max_new_tokens) == (2, 0.7, 3)
    assert m["eval/samples"] == 4.0 and m["eval/response_length"] == pytest.approx((3 + 2 + 3 + 3) / 4)


def test_evaluate_syncs_the_last_update_once_and_leaves_training_state_alone():
    sync = FakeSync()
    coord = _coordinator(_config(eval={"every": 1}), weight_sync=sync, eval_prompts=_eval_prompts())
    coord.step()
    state = coord.state_dict()
    assert sync.calls == 0  # the update of step 0 is not synced yet
    m, _ = coord.evaluate()
    assert sync.calls == 1 and m["iteration"] == 1  # evaluated on the weights after one update
    assert coord.state_dict() == state  # prompt order, KL controller, score moments untouched
    assert "sync_bytes" not in coord.step()  # the next step does not sync the same weights again
    assert sync.calls == 1


def test_evaluate_counts_non_finite_scores_and_averages_the_rest():
    coord = _coordinator(_config(eval={"every": 1}), reward=FakeReward((1.0, float("nan"), 0.5)),
                         eval_prompts=_eval_prompts(3))
    m, _ = coord.evaluate()
    assert m["eval/nonfinite_scores"] == 1.0
    assert m["eval/reward_mean"] == pytest.approx(0.75)


def test_evaluate_without_prompts_says_how_to_enable_it():
    with pytest.raises(ValueError, match="--eval.every"):
        _coordinator().evaluate()


def test_evaluate_between_async_steps_leaves_the_batch_in_flight_alone():
    rollout, sync = FakeRollout(), FakeSync()
    cfg = _config(rollout={"prompts_per_iteration": B, "samples_per_prompt": 1, "max_new_tokens": R,
                           "num_engines": 1, "async_generation": True}, eval={"every": 1})
    coord = _coordinator(cfg, rollout=rollout, weight_sync=sync, eval_prompts=_eval_prompts())
    coord.step()
    m_eval, _ = coord.evaluate()
    assert sync.calls == 1 and m_eval["iteration"] == 1  # the update of step 0 reached the engines first
    m = coord.step()
    coord.close()
    fresh = PromptSampler(7, seed=3)
    assert m["prompt_indices"] == [fresh.next(B) for _ in range(2)][1]  # generated during step 0, trained now
    assert sync.calls == 1  # not synced twice
    # generate calls: batch 0, batch 1 (ahead), the evaluation, then batch 2 (ahead) may have started
    assert [p for p, _ in rollout.calls][2] == _eval_prompts().token_ids
    assert [spec.temperature for _, spec in rollout.calls][:3] == [1.0, 1.0, 0.0]
