"""The asynchronous pipeline (rollout.max_staleness >= 1): its pieces by hand, then the
coordinator driven by the in-process fakes of test_coordinator (no Ray).

Threads make the order of calls vary from run to run, so these tests check what must hold in
every order (the staleness bound, prompts trained once each in the sampler's order, versions), and
force an order where one is the point of the test with events the fakes wait on (each wait has a
timeout, so a pipeline that does not overlap fails instead of hanging).
"""

import threading
import time

import pytest

from rlhf_ray.backends.rollout import SamplingSpec
from rlhf_ray.batch import Generation
from rlhf_ray.config import ConfigError, validate
from rlhf_ray.coordinator.pipeline import EngineVersion, generate_in_segments, staleness_metrics
from rlhf_ray.data.prompts import PromptSampler
from rlhf_ray.runtime.pending import Done, RemoteCallError
from tests.unit.test_coordinator import (B, EOS, R, FakeLearners, FakeReward, FakeRollout, FakeSync,
                                         LearnersFailingOnce, _config, _coordinator, _eval_prompts, _prompts)

WAIT = 10.0  # seconds a fake waits for the event a test needs before it gives up


def _pipeline_config(k: int, ppo: dict | None = None, **rollout):
    return _config(ppo=ppo, rollout={"prompts_per_iteration": B, "samples_per_prompt": 1, "max_new_tokens": R,
                                     "num_engines": 1, "max_staleness": k, **rollout})


def _drawn(n_batches: int) -> list[list[int]]:
    fresh = PromptSampler(7, seed=3)
    return [fresh.next(B) for _ in range(n_batches)]


# ---- the pieces by hand --------------------------------------------------------------------


class CountingEngine:
    """A generate call: response j of a prompt counts up from 100 (token 100, 101, ...), logprob
    -0.1 per token; a response ends with EOS at its ``stops[j]``-th token (0: never, cut at the limit)."""

    def __init__(self, stops: list[int]) -> None:
        self.stops = stops
        self.calls: list[tuple[list[list[int]], SamplingSpec]] = []

    def __call__(self, prompt_ids, spec):
        self.calls.append(([list(p) for p in prompt_ids], spec))
        out = Generation([], [], [], [], [])
        for i, p in enumerate(prompt_ids):
            for _ in range(spec.n):
                row = len(out)
                first = len(self.calls) == 1
                j = row if first else self._row_of(p)
                done = len([t for t in p if t >= 100])  # tokens sampled so far (prompt tokens are < 100)
                tokens, reason = [], "length"
                while len(tokens) < spec.max_new_tokens:
                    tokens.append(100 + done + len(tokens))
                    if self.stops[j] and done + len(tokens) == self.stops[j]:
                        tokens[-1] = EOS
                        reason = "stop"
                        break
                out.prompt_ids.append(list(p))
                out.response_ids.append(tokens)
                out.logprobs.append([-0.1] * len(tokens))
                out.finish_reasons.append(reason)
                out.prompt_index.append(i)
        return Done(out)

    def _row_of(self, prompt):
        return prompt[0]  # continuation prompts start with the row number (see the test)


def test_generate_in_segments_joins_the_segments_as_one_call_would_give_them():
    # 3 rows (prompt [row]), max 7 tokens, segments of 3: row 0 stops at token 2 (first segment),
    # row 1 at token 5 (second segment), row 2 never (cut at 7 after three segments: 3 + 3 + 1).
    engine = CountingEngine(stops=[2, 5, 0])
    versions = EngineVersion()
    spec = SamplingSpec(n=1, max_new_tokens=7)
    gen = generate_in_segments(versions.tagged(engine), [[0], [1], [2]], spec, segment=3)
    assert gen.response_ids == [[100, EOS], [100, 101, 102, 103, EOS], [100, 101, 102, 103, 104, 105, 106]]
    assert gen.finish_reasons == ["stop", "stop", "length"]
    assert [len(lp) for lp in gen.logprobs] == [2, 5, 7]
    assert gen.versions == [[0, 0], [0] * 5, [0] * 7]
    # calls: all rows with 3 tokens; rows 1 and 2 go on from prompt + tokens (n = 1, 3 more); row 2 the last 1
    assert [(p, s.max_new_tokens, s.n) for p, s in engine.calls] == [
        ([[0], [1], [2]], 3, 1), ([[1, 100, 101, 102], [2, 100, 101, 102]], 3, 1),
        ([[2, 100, 101, 102, 103, 104, 105]], 1, 1)]


def test_a_sync_between_segments_tags_the_later_tokens_with_the_new_version():
    engine = CountingEngine(stops=[0])
    versions = EngineVersion()
    calls = []

    def call(prompt_ids, spec):
        calls.append(1)
        if len(calls) == 2:  # a sync lands after the first segment
            versions.sync(lambda: {}, 1)
        return versions.tagged(engine)(prompt_ids, spec)

    gen = generate_in_segments(call, [[0]], SamplingSpec(n=1, max_new_tokens=5), segment=2)
    assert gen.versions == [[0, 0, 1, 1, 1]]
    assert staleness_metrics(gen.versions, None, trained_at=1, bound=1) == {
        "staleness/mean": pytest.approx(2 / 5), "staleness/max": 1.0, "staleness/spanning_samples": 1.0,
        "staleness/share_0": pytest.approx(3 / 5), "staleness/share_1": pytest.approx(2 / 5)}


def test_staleness_metrics_count_the_policy_tokens_only_and_refuse_a_broken_bound():
    versions = [[3, 3, 9, 4], [2, 2]]  # sample 0's third token is an observation (version 9 ignored)
    actions = [[True, True, False, True], [True, True]]
    m = staleness_metrics(versions, actions, trained_at=4, bound=2)
    # lags: sample 0: 1, 1, 0; sample 1: 2, 2 -> mean 6/5, max 2; sample 0 spans versions 3 and 4
    assert m["staleness/mean"] == pytest.approx(6 / 5) and m["staleness/max"] == 2.0
    assert m["staleness/spanning_samples"] == 0.5
    assert [m[f"staleness/share_{k}"] for k in range(3)] == pytest.approx([1 / 5, 2 / 5, 2 / 5])
    with pytest.raises(RuntimeError, match="lags 2 policy versions"):
        staleness_metrics(versions, actions, trained_at=4, bound=1)


# ---- the coordinator with the pipeline ------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 4])
def test_every_prompt_is_trained_once_in_order_and_no_token_lags_more_than_k(k):
    learners = FakeLearners(train_seconds=0.02)  # a slow learner: the generation runs as far ahead as it may
    coord = _coordinator(_pipeline_config(k), learners=learners)
    rows = [coord.step() for _ in range(8)]
    coord.close()
    assert [r["prompt_indices"] for r in rows] == _drawn(8)
    assert all(r["staleness/max"] <= k for r in rows)
    assert max(r["staleness/max"] for r in rows) == k  # the bound is reached, not just respected
    assert [r["policy_version"] for r in rows] == list(range(8))
    # the tokens sampled by the learner's own version are compared on their own (they must agree)
    assert all(("logprob_mismatch_fresh_max" in r) == (r["staleness/share_0"] > 0) for r in rows)
    assert {"time/generate", "time/score", "time/old_logprobs", "time/wait_batch"} <= set(rows[-1])
    lanes = {e[0] for e in rows[-1]["timeline"]}
    assert {"engines", "reference+reward", "learner", "coordinator"} <= lanes


def test_on_policy_generates_only_while_the_learner_is_idle_and_the_pipeline_does_not():
    for k, overlapped in ((0, False), (1, True)):
        learners = FakeLearners()
        generating_during_train = []
        rollout = FakeRollout()
        first_train = threading.Event()
        second_generation = threading.Event()
        inner_generate, inner_train = rollout.generate, learners.train

        def generate(prompt_ids, spec, inner=inner_generate, seen=second_generation):
            if len(rollout.calls) == 1:
                seen.set()
            return inner(prompt_ids, spec)

        def train(batch, iteration, inner=inner_train, seen=second_generation, log=generating_during_train):
            # the first update waits (at most WAIT s) for the next batch's generation to start
            if iteration == 0:
                log.append(seen.wait(WAIT if k else 0.3))
            return inner(batch, iteration)

        rollout.generate, learners.train = generate, train
        coord = _coordinator(_pipeline_config(k), rollout=rollout, learners=learners)
        coord.step()
        coord.step()
        coord.close()
        assert generating_during_train == [overlapped], k


def test_a_failed_update_rolls_back_and_the_same_prompts_are_trained_next():
    coord = _coordinator(_pipeline_config(2), learners=LearnersFailingOnce(at=2))
    trained = [coord.step()["prompt_indices"] for _ in range(2)]
    with pytest.raises(RemoteCallError):
        coord.step()
    assert coord.iteration == 2 and coord.policy_version == 2
    assert coord.pending_prompts[0] == _drawn(3)[2]  # the failed batch's prompts come first again
    trained += [coord.step()["prompt_indices"] for _ in range(3)]
    coord.close()
    assert trained == _drawn(5)


def test_a_failed_generation_ahead_fails_the_step_that_needs_it_with_its_phase():
    class DyingRollout(FakeRollout):
        def generate(self, prompt_ids, spec):
            if len(self.calls) == 2 and not getattr(self, "died", False):
                self.died = True
                self.calls.append((prompt_ids, spec))
                raise RemoteCallError("generate: rollout engine 0 died", "died", ("rollout", 0), "generate")
            return super().generate(prompt_ids, spec)

    rollout = DyingRollout()
    coord = _coordinator(_pipeline_config(1), rollout=rollout)
    trained = [coord.step()["prompt_indices"] for _ in range(2)]
    with pytest.raises(RemoteCallError) as info:
        coord.step()
    assert info.value.phase == "generate"
    trained += [coord.step()["prompt_indices"] for _ in range(2)]  # the same prompts, generated again
    coord.close()
    assert trained == _drawn(4)


def test_checkpoint_state_resumes_the_pending_prompts_in_order():
    a = _coordinator(_pipeline_config(2), learners=FakeLearners(train_seconds=0.01))
    for _ in range(3):
        a.step()
    state = a.state_dict()
    a.close()
    assert state["pending_prompts"] == _drawn(3 + len(state["pending_prompts"]))[3:]
    assert 1 <= len(state["pending_prompts"]) <= 3 and state["policy_version"] == 3
    b = _coordinator(_pipeline_config(2))
    b.load_state_dict(state)
    b.mark_weights_stale()
    rows = [b.step() for _ in range(4)]
    b.close()
    assert [r["prompt_indices"] for r in rows] == _drawn(7)[3:]
    assert all(r["staleness/max"] <= 2 for r in rows)


def test_a_checkpoint_of_the_one_step_async_loop_resumes_in_the_pipeline():
    # state written before the pipeline: pending_prompts was one list (or None)
    a = _coordinator(_pipeline_config(0))
    a.step()
    state = {**a.state_dict(), "pending_prompts": _drawn(2)[1]}
    del state["policy_version"]
    b = _coordinator(_pipeline_config(1))
    b.load_state_dict(state)
    assert b.pending_prompts == [_drawn(2)[1]] and b.policy_version == 1
    assert b.step()["prompt_indices"] == _drawn(2)[1]
    b.close()


def test_evaluation_waits_for_the_generation_in_flight_and_keeps_what_was_generated_ahead():
    events: list[str] = []
    release = threading.Event()

    class SlowRollout(FakeRollout):
        def generate(self, prompt_ids, spec):
            done = super().generate(prompt_ids, spec)
            if spec.temperature == 0.0:
                events.append("eval generate")
                return done
            n = len(self.calls)

            class InFlight:
                def result(self_inner):
                    if n == 2:  # batch 1: still generating when the evaluation starts
                        release.wait(WAIT)
                        time.sleep(0.05)
                    events.append(f"generation {n - 1} finished")
                    return done.result()
            return InFlight()

    class LoggedSync(FakeSync):
        def sync(self):
            events.append("sync")
            return super().sync()

    rollout, sync = SlowRollout(), LoggedSync()
    cfg = _config(rollout={"prompts_per_iteration": B, "samples_per_prompt": 1, "max_new_tokens": R,
                           "num_engines": 1, "max_staleness": 1}, eval={"every": 1})
    coord = _coordinator(cfg, rollout=rollout, weight_sync=sync, eval_prompts=_eval_prompts())
    coord.step()  # trains batch 0; batch 1 generates (held until released)
    threading.Timer(0.1, release.set).start()
    m, _ = coord.evaluate()
    assert events.index("generation 1 finished") < events.index("sync") < events.index("eval generate")
    assert m["time/eval_wait_generation"] > 0.0
    row = coord.step()
    coord.close()
    assert row["prompt_indices"] == _drawn(2)[1]
    train_calls = [s for _, s in rollout.calls if s.temperature != 0.0]
    assert len(train_calls) <= 3  # batches 0, 1 and at most 2 ahead: batch 1 was not generated twice


def test_a_generation_that_fails_while_an_evaluation_waits_for_it_is_generated_again():
    class DyingRollout(FakeRollout):
        def generate(self, prompt_ids, spec):
            if len(self.calls) == 1:  # batch 1, generated ahead
                self.calls.append((prompt_ids, spec))
                raise RemoteCallError("generate: rollout engine 0 died", "died", ("rollout", 0), "generate")
            return super().generate(prompt_ids, spec)

    rollout, sync = DyingRollout(), FakeSync()
    cfg = _config(rollout={"prompts_per_iteration": B, "samples_per_prompt": 1, "max_new_tokens": R,
                           "num_engines": 1, "max_staleness": 1}, eval={"every": 1})
    coord = _coordinator(cfg, rollout=rollout, weight_sync=sync, eval_prompts=_eval_prompts())
    coord.step()
    deadline = time.monotonic() + WAIT
    while len(rollout.calls) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(RemoteCallError) as info:
        coord.evaluate()
    assert info.value.phase == "generate"
    assert sync.calls == 0  # nothing synced to an engine that is being replaced
    # (the recovery path replaces the engine here and marks the weights stale)
    assert coord.pending_prompts == [_drawn(2)[1]]
    m = coord.step()  # the same prompts, generated again
    coord.close()
    assert m["prompt_indices"] == _drawn(2)[1]


def test_in_flight_update_with_partial_rollouts_spans_two_versions():
    # batch 1 generates in segments of 2 tokens while batch 0 trains (the update waits until batch
    # 1 has begun); its first segment ends only once the sync of batch 0's update has begun, so its
    # responses go on with version 1.
    synced, started = threading.Event(), threading.Event()

    class Gated(FakeRollout):
        first_segments = 0

        def generate(self, prompt_ids, spec):
            done = super().generate(prompt_ids, spec)
            if len(prompt_ids) == B and all(len(p) < 4 for p in prompt_ids):  # a batch's first segment
                self.first_segments += 1
                if self.first_segments == 2:  # batch 1's
                    started.set()

                    class Later:
                        def result(self_inner):
                            synced.wait(WAIT)
                            return done.result()
                    return Later()
            return done

    class SignallingSync(FakeSync):
        def sync(self):
            synced.set()
            return super().sync()

    class WaitingLearners(FakeLearners):
        def train(self, batch, iteration):
            assert iteration > 0 or started.wait(WAIT)
            return super().train(batch, iteration)

    rollout = Gated()
    cfg = _pipeline_config(1, partial_rollout_tokens=2)
    assert cfg.ppo.rollout_correction == "tis"
    coord = _coordinator(cfg, rollout=rollout, weight_sync=SignallingSync(), learners=WaitingLearners())
    rows = [coord.step() for _ in range(2)]
    coord.close()
    # batch 1's sample 0: 2 tokens at version 0, then 3 at version 1; trained at version 1
    assert rows[1]["staleness/spanning_samples"] > 0
    assert rows[1]["staleness/max"] == 1 and rows[1]["staleness/share_0"] > 0
    assert rows[0]["staleness/max"] == 0 and rows[0]["staleness/spanning_samples"] == 0
    continuations = [p for p, spec in rollout.calls if any(len(x) >= 4 for x in p)]
    assert continuations and all(spec.n == 1 for p, spec in rollout.calls if p in continuations)


def test_a_critic_warm_up_in_the_pipeline_keeps_the_policy_version():
    coord = _coordinator(_pipeline_config(1, ppo={"mini_batches": 1, "critic_warmup_iterations": 3}))
    rows = [coord.step() for _ in range(5)]
    coord.close()
    assert [r["policy_version"] for r in rows] == [0, 0, 0, 0, 1]
    assert [r["critic_warmup"] for r in rows] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert all(r["staleness/max"] <= 1 for r in rows)


def test_dynamic_sampling_runs_in_the_pipeline_on_the_scores_it_got_ahead():
    reward = FakeReward(scores=(1.0, 1.0, 1.0, 0.0))  # some groups of 2 vary, some do not
    cfg = _config(ppo={"mini_batches": 1, "dynamic_sampling": True, "estimator": "grpo"},
                  rollout={"prompts_per_iteration": 2, "samples_per_prompt": 2, "max_new_tokens": R,
                           "num_engines": 1, "max_staleness": 1}, learner={"num_ranks": 1, "micro_batch_size": 4})
    validate(cfg)
    coord = _coordinator(cfg, reward=reward)
    rows = [coord.step() for _ in range(3)]
    coord.close()
    assert all(r["samples"] == 4 for r in rows)
    # no generation is scored twice (the learner stage uses the scores the pipeline got ahead); the
    # last batch generated ahead may not be scored yet when the pipeline stops
    assert len(coord.rollout.calls) - 1 <= len(reward.calls) <= len(coord.rollout.calls)


# ---- configuration -----------------------------------------------------------------------


def test_staleness_settings_resolve_and_bad_ones_are_refused():
    assert _pipeline_config(2).ppo.rollout_correction == "tis"
    assert _pipeline_config(0).ppo.rollout_correction == "none"
    assert _config(rollout={"async_generation": True}).rollout.staleness == 1
    alias = _coordinator(_config(rollout={"prompts_per_iteration": B, "samples_per_prompt": 1, "max_new_tokens": R,
                                          "num_engines": 1, "async_generation": True}),
                         learners=FakeLearners(train_seconds=0.02))
    assert max(alias.step()["staleness/max"] for _ in range(4)) == 1  # the pipeline, one version ahead
    alias.close()
    bad = {
        "max_staleness must be >= 0": {"max_staleness": -1},
        "drop --rollout.async_generation": {"max_staleness": 0, "async_generation": True},
        "does nothing on-policy": {"max_staleness": 0, "partial_rollout_tokens": 2},
        "splits nothing": {"max_staleness": 1, "partial_rollout_tokens": R},
        "stop string split": {"max_staleness": 1, "partial_rollout_tokens": 2, "stop": ["</a>"]},
    }
    for message, rollout in bad.items():
        with pytest.raises(ConfigError, match=message):
            validate(_pipeline_config(**{"k": rollout.pop("max_staleness"), **rollout}))
    validate(_pipeline_config(2, partial_rollout_tokens=2))


def test_episodes_run_in_the_pipeline_with_every_token_tagged():
    from rlhf_ray.config import config_from_dict
    from rlhf_ray.coordinator.loop import PPOCoordinator
    from tests.unit.test_coordinator import PAD, FakeReference, _prompts, _put
    from tests.unit.test_episodes import CharTokenizer, EpisodeRollout, ObservationBlindLearners

    cfg = config_from_dict({"seed": 3, "rollout": {"prompts_per_iteration": 2, "samples_per_prompt": 2,
                                                   "max_new_tokens": 8, "num_engines": 1, "max_turns": 3,
                                                   "env": "tests.unit.test_episodes:Calc", "max_staleness": 1},
                            "ppo": {"mini_batches": 1}, "learner": {"num_ranks": 1, "micro_batch_size": 4}})
    rollout = EpisodeRollout()

    class Waiting(ObservationBlindLearners):
        def train(self, update, iteration):  # the first update waits until batch 1's episodes began
            deadline = time.monotonic() + WAIT
            while iteration == 0 and len(rollout.engine.contexts) <= 4 * 2 and time.monotonic() < deadline:
                time.sleep(0.005)  # batch 0: 4 episodes of 2 turns
            return super().train(update, iteration)

    coord = PPOCoordinator(cfg, _prompts(), PAD, [EOS], rollout, FakeReference(gap=0.5), FakeReward(),
                           Waiting(), FakeSync(), put=_put, tokenizer=CharTokenizer())
    rows = [coord.step() for _ in range(3)]
    coord.close()
    fresh = PromptSampler(7, seed=3)
    assert [r["prompt_indices"] for r in rows] == [fresh.next(2) for _ in range(3)]
    assert all(r["episode/turns_mean"] == 2.0 and r["staleness/max"] <= 1 for r in rows)
    assert max(r["staleness/max"] for r in rows) == 1  # episodes were generated ahead
    # the learner's logprobs are -7 at observations: the fresh-token check must leave them out
    assert all(r.get("logprob_mismatch_fresh_max", 0.0) == 0.0 for r in rows)
