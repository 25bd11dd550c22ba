"""Evaluation between async steps: the batch in flight is awaited before the evaluation's weight
sync and kept for the next step (in-process fakes from test_coordinator, no Ray).

A real engine runs one call at a time, so a sync sent while it still generates the next batch
waits behind that generation, and learner rank 0 meanwhile waits in the broadcast against
sync.timeout_s. The fakes below record when the generation in flight is finished (its
``result``) relative to the sync, and how often it is asked for.
"""

import pytest
import torch

from rlhf_ray.runtime.pending import Done, RemoteCallError
from tests.unit.test_coordinator import (B, R, FakeLearners, FakeRollout, FakeSync, _config, _coordinator,
                                         _eval_prompts)


class InFlight:
    """A generation still running: finishes when ``result`` is first called, and logs it then."""

    def __init__(self, done: Done, events: list[str]) -> None:
        self.done, self.events = done, events
        self.error: Exception | None = None  # raised by result() when set
        self.results = 0

    def result(self):
        self.results += 1
        self.events.append("generation finished")
        if self.error is not None:
            raise self.error
        return self.done.result()


class SlowRollout(FakeRollout):
    """Training generations (temperature 1) stay in flight until awaited; evaluation ones (greedy)
    are finished at once."""

    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events
        self.in_flight: list[InFlight] = []

    def generate(self, prompt_ids, spec):
        done = super().generate(prompt_ids, spec)
        if spec.temperature == 0.0:
            self.events.append("eval generate")
            return done
        self.in_flight.append(InFlight(done, self.events))
        return self.in_flight[-1]


class LoggedSync(FakeSync):
    def __init__(self, events: list[str]) -> None:
        super().__init__()
        self.events = events

    def sync(self):
        self.events.append("sync")
        return super().sync()


def _async_coordinator(events: list[str], learners: FakeLearners | None = None):
    rollout, sync = SlowRollout(events), LoggedSync(events)
    cfg = _config(rollout={"prompts_per_iteration": B, "samples_per_prompt": 1, "max_new_tokens": R,
                           "num_engines": 1, "async_generation": True}, eval={"every": 1})
    coord = _coordinator(cfg, rollout=rollout, weight_sync=sync, learners=learners or FakeLearners(),
                         eval_prompts=_eval_prompts())
    return coord, rollout, sync


def test_the_generation_in_flight_finishes_before_the_evaluation_syncs():
    events: list[str] = []
    coord, rollout, sync = _async_coordinator(events)
    coord.step()  # generates batch 0, sends batch 1, trains on batch 0
    events.clear()
    m_eval, _ = coord.evaluate()
    assert events == ["generation finished", "sync", "eval generate"]
    assert sync.calls == 1 and m_eval["iteration"] == 1
    assert m_eval["time/eval_wait_generation"] >= 0.0


def test_the_awaited_batch_is_the_one_the_next_step_trains_on():
    events: list[str] = []
    learners = FakeLearners()
    coord, rollout, sync = _async_coordinator(events, learners)
    coord.step()
    pending = list(coord.pending_prompts)
    batch_1 = rollout.in_flight[1]
    coord.evaluate()
    m = coord.step()
    assert m["prompt_indices"] == pending
    assert batch_1.results == 1  # awaited once, by the evaluation; its result kept, not asked again
    # generations: batch 0, batch 1, the evaluation, batch 2 (sent during step 1): none repeated
    assert len(rollout.calls) == 4 and len(rollout.in_flight) == 3
    trained_on = learners.old_calls[-1]
    expected = batch_1.done.result()
    assert trained_on.response_mask.sum(-1).tolist() == [len(r) for r in expected.response_ids]
    assert torch.equal(trained_on.rollout_logprobs[trained_on.response_mask],
                       torch.tensor([x for lp in expected.logprobs for x in lp]))
    assert sync.calls == 1  # the next step does not sync the same weights again


def test_a_failed_generation_in_flight_is_generated_again_by_the_next_step():
    events: list[str] = []
    coord, rollout, sync = _async_coordinator(events)
    coord.step()  # batch 0 done; batch 1 sent (and will fail)
    rollout.in_flight[1].error = RemoteCallError("generate: rollout engine 0 died", "died", ("rollout", 0),
                                                 "generate")
    pending = list(coord.pending_prompts)
    with pytest.raises(RemoteCallError) as info:
        coord.evaluate()
    assert info.value.phase == "generate"
    assert sync.calls == 0  # nothing synced to an engine that is being replaced
    # (the recovery path replaces the engine here and marks the weights stale)
    m = coord.step()  # generates the same prompts again, synchronously, then trains on them
    assert m["prompt_indices"] == pending
    assert rollout.in_flight[1].results == 1  # the failed call is not asked again
    assert rollout.calls[2][0] == [coord.prompts.token_ids[i] for i in pending]
