"""Recovery with in-process fakes of the roles and the coordinator (no Ray): what is replaced or
restarted, in which order, and when it gives up."""

from types import SimpleNamespace

import pytest

from rlhf_ray.coordinator.pending import Done, RemoteCallError
from rlhf_ray.coordinator.recovery import Recovery


def died(role: str, i: int = 0, kind: str = "died") -> RemoteCallError:
    return RemoteCallError(f"{role} {i} {kind}", kind, (role, i), "a call")


class FakeRoles:
    """``failures``: what each ``replace`` call raises in turn (None = succeeds)."""

    def __init__(self, failures: list) -> None:
        self.failures, self.calls = list(failures), []
        self.learners = SimpleNamespace(load_checkpoint=lambda path: Done(None))

    def replace(self, source) -> None:
        self.calls.append(("replace", source))
        failure = self.failures.pop(0) if self.failures else None
        if failure is not None:
            raise failure

    def restart_learners(self) -> None:
        self.calls.append(("restart_learners",))


class FakeCoord:
    def __init__(self, iteration: int) -> None:
        self.iteration, self.stale = iteration, False

    def load_state_dict(self, state: dict) -> None:
        self.iteration = state["iteration"]

    def mark_weights_stale(self) -> None:
        self.stale = True


def recovery(tmp_path, roles, coord, max_actor_restarts=3, max_learner_restarts=2) -> Recovery:
    cfg = SimpleNamespace(resources=SimpleNamespace(max_actor_restarts=max_actor_restarts,
                                                    max_learner_restarts=max_learner_restarts))
    return Recovery(cfg, roles, coord, str(tmp_path), {"iteration": 0}, say=lambda line: None)


def test_a_dead_engine_is_replaced_and_the_same_iteration_redone(tmp_path):
    roles, coord = FakeRoles([]), FakeCoord(5)
    rec = recovery(tmp_path, roles, coord)
    assert rec.handle(died("rollout", 1)) == 5
    assert roles.calls == [("replace", ("rollout", 1))] and coord.stale
    assert rec.counters() == {"faults/actor_restarts": 1.0, "faults/learner_restarts": 0.0}


def test_a_learner_failing_while_an_engine_is_replaced_restarts_the_learner_group(tmp_path):
    # In CI learner rank 0 became unreachable while the sync group was rebuilt for the new engine:
    # that error escaped the recovery and ended the run.
    learner_lost = died("learner", 0)
    roles, coord = FakeRoles([learner_lost]), FakeCoord(5)
    rec = recovery(tmp_path, roles, coord)
    assert rec.handle(died("rollout", 0)) == 0  # no checkpoint in run_dir: from the initial state
    assert roles.calls == [("replace", ("rollout", 0)), ("restart_learners",)]
    assert rec.counters() == {"faults/actor_restarts": 1.0, "faults/learner_restarts": 1.0}
    assert learner_lost.phase == "recovery" and coord.stale


def test_failures_during_recovery_count_against_the_same_limits(tmp_path):
    # The replacement engine dies at once, every time: bounded by max_actor_restarts.
    roles = FakeRoles([died("rollout", 0) for _ in range(10)])
    rec = recovery(tmp_path, roles, FakeCoord(3), max_actor_restarts=3)
    with pytest.raises(RuntimeError, match="giving up after 3 actor replacements"):
        rec.handle(died("rollout", 0))
    assert roles.calls == [("replace", ("rollout", 0))] * 3


def test_an_error_raised_during_recovery_is_not_retried(tmp_path):
    bad = died("reward", 0, kind="error")  # e.g. the new reward actor's function raises
    roles = FakeRoles([bad])
    with pytest.raises(RemoteCallError) as info:
        recovery(tmp_path, roles, FakeCoord(2)).handle(died("reward", 0))
    assert info.value is bad and roles.calls == [("replace", ("reward", 0))]
