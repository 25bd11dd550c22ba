"""Names of remote sources in errors; RayPending's deadline, and that it never cancels a call,
over an in-process fake of ``ray`` (no Ray started)."""

import math
import time
from types import SimpleNamespace

import pytest

from rlhf_ray.runtime.pending import RayPending, RemoteCallError, describe


def test_describe_names_every_role_and_rank():
    assert describe(("rollout", 2)) == "rollout engine 2"
    assert describe(("learner", 1)) == "learner rank 1"
    assert describe(("sft", 0)) == "sft rank 0"  # supervised trainers use the same calls
    assert describe(("reference", 0)) == "reference" and describe(("reward", 0)) == "reward"


def test_error_message_carries_the_phase():
    exc = RemoteCallError("PPO update: learner rank 1 died", "died", ("learner", 1), "PPO update")
    exc.phase = "update"
    assert str(exc) == "[phase update] PPO update: learner rank 1 died"


# ---- deadlines, no cancellation (RayPending over an in-process fake of ray) ------------------

class FakeActorError(Exception):
    pass


class FakeTaskError(Exception):
    pass


class FakeRay:
    """Stands in for the ``ray`` module: call ``ref`` answers ``answers[ref] = (seconds after the
    fake was made, value or exception)``; a ref missing from ``answers`` never answers. ``wait``
    sleeps for real (the deadline is on the real monotonic clock) and honours its timeout."""

    def __init__(self, answers: dict[str, tuple[float, object]]) -> None:
        self.start = time.monotonic()
        self.answers = answers
        self.cancelled: list[str] = []
        self.fetch_local: list[bool] = []
        self.exceptions = SimpleNamespace(RayActorError=FakeActorError, RayTaskError=FakeTaskError)

    def _due(self, ref: str) -> float:
        return self.answers[ref][0] if ref in self.answers else math.inf

    def wait(self, refs, num_returns, timeout, fetch_local):
        assert num_returns == 1
        self.fetch_local.append(fetch_local)
        first = min(refs, key=self._due)
        delay = max(0.0, self.start + self._due(first) - time.monotonic())
        if delay > timeout:
            time.sleep(timeout)
            return [], list(refs)
        time.sleep(delay)
        return [first], [r for r in refs if r != first]

    def get(self, ref):
        value = self.answers[ref][1]
        if isinstance(value, Exception):
            raise value
        return value

    def cancel(self, ref):  # recorded so tests can check that RayPending never calls it
        self.cancelled.append(ref)


def test_the_timeout_runs_from_the_call_not_from_result():
    # The score phase: calls sent together, awaited one after another. The reference answers
    # after 0.5 s; the reward never does. Its 0.6 s run from the call, so the phase gives up
    # 0.6 s after sending, not 0.5 + 0.6 s.
    fake = FakeRay({"ref": (0.5, "logprobs")})
    sent = time.monotonic()
    reference = RayPending(["ref"], [("reference", 0)], "reference logprobs", 0.6, lambda xs: xs[0], api=fake)
    reward = RayPending(["rew"], [("reward", 0)], "reward scoring", 0.6, lambda xs: xs[0], api=fake)
    assert sent <= reward.submitted <= time.monotonic()
    assert reference.result() == "logprobs"
    with pytest.raises(RemoteCallError, match=r"no answer from reward within 0.6 s of the call") as info:
        reward.result()
    waited = time.monotonic() - sent
    assert info.value.kind == "timeout" and info.value.source == ("reward", 0)
    assert 0.6 <= waited < 0.95, waited  # from the call: 0.6 s (1.1 s if it ran from result())


def test_a_call_answered_in_time_counts_even_when_awaited_after_its_deadline():
    # Async generation awaits its batch a whole update after sending it: the answer came in time.
    fake = FakeRay({"g0": (0.0, [1]), "g1": (0.05, [2])})
    pending = RayPending(["g0", "g1"], [("rollout", 0), ("rollout", 1)], "generate", 0.1, api=fake)
    time.sleep(0.2)
    assert pending.result() == [[1], [2]]
    # Readiness means "the call returned", not "its value is already on this node".
    assert fake.fetch_local and not any(fake.fetch_local)


def test_calls_that_timed_out_are_named_and_left_alone():
    # ray.cancel on an actor call not yet delivered stalls that actor's later calls (see
    # RayPending): a timed-out actor is replaced by the recovery path instead.
    fake = FakeRay({"r0": (0.0, {"loss": 1.0})})
    pending = RayPending(["r0", "r1", "r2"], [("learner", i) for i in range(3)], "PPO update", 0.1, api=fake)
    with pytest.raises(RemoteCallError, match="no answer from learner rank 1, learner rank 2") as info:
        pending.result()
    assert info.value.kind == "timeout" and info.value.source == ("learner", 1)
    assert fake.cancelled == []


def test_a_failure_raises_at_once_and_cancels_nothing():
    fake = FakeRay({"e0": (0.0, FakeActorError("engine 0 is gone"))})
    pending = RayPending(["e0", "e1"], [("rollout", 0), ("rollout", 1)], "weight sync", 5.0, api=fake)
    t0 = time.monotonic()
    with pytest.raises(RemoteCallError, match="weight sync: rollout engine 0 died") as info:
        pending.result()
    assert info.value.kind == "died" and time.monotonic() - t0 < 1.0  # not waiting for e1 (never answers)
    assert fake.cancelled == []  # e1's actor lives on: its later calls must not be stalled
