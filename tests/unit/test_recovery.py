"""Recovery with in-process fakes of the roles and the coordinator (no Ray): what is replaced or
restarted, in which order, and when it gives up."""

import math
import time
from types import SimpleNamespace

import pytest

from rlhf_ray.coordinator.recovery import NodeLostError, Recovery
from rlhf_ray.runtime.pending import Done, RemoteCallError, attribute_failure


def died(role: str, i: int = 0, kind: str = "died") -> RemoteCallError:
    return RemoteCallError(f"{role} {i} {kind}", kind, (role, i), "a call")


class FakeRoles:
    """``failures``: what each ``replace`` call raises in turn (None = succeeds)."""

    def __init__(self, failures: list, lost: dict | None = None) -> None:
        self.failures, self.calls = list(failures), []
        self.learners = SimpleNamespace(load_checkpoint=lambda path: Done(None))
        self.lost = lost or {}  # source -> what Roles.lost_node reports for it (None: its node is alive)

    def lost_node(self, source):
        return self.lost.get(source)

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


# ---- a failed weight sync is blamed on the member that failed (attribute_failure) ------------

class Probe:
    """Stands in for the ping of every sync member: all answer, or it raises ``failure``."""

    def __init__(self, failure: RemoteCallError | None = None) -> None:
        self.failure, self.calls = failure, 0

    def __call__(self):
        self.calls += 1
        return Done(["pong"]) if self.failure is None else SimpleNamespace(result=self._raise)

    def _raise(self):
        raise self.failure


def _broadcast_error() -> RemoteCallError:
    return RemoteCallError("weight sync: learner rank 0 failed: Connection closed by peer", "error", ("learner", 0),
                           "weight sync")


def test_a_learner_error_in_a_sync_is_blamed_on_the_engine_found_dead(tmp_path):
    first = _broadcast_error()
    blamed = attribute_failure(first, Probe(died("rollout", 1)))
    assert (blamed.kind, blamed.source, blamed.what) == ("died", ("rollout", 1), "weight sync")
    assert blamed.__cause__ is first
    assert "rollout engine 1 died" in str(blamed) and "first seen as: weight sync: learner rank 0 failed" in str(blamed)
    # ... so recovery replaces the engine and redoes the iteration instead of ending the run
    roles, coord = FakeRoles([]), FakeCoord(7)
    assert recovery(tmp_path, roles, coord).handle(blamed) == 7
    assert roles.calls == [("replace", ("rollout", 1))] and coord.stale


def test_a_sync_timeout_is_blamed_on_the_engine_that_does_not_answer():
    first = RemoteCallError("weight sync: no answer from learner rank 0, rollout engine 1", "timeout",
                            ("learner", 0), "weight sync")
    blamed = attribute_failure(first, Probe(died("rollout", 1, kind="timeout")))
    assert (blamed.kind, blamed.source) == ("timeout", ("rollout", 1)) and "stopped answering" in str(blamed)


def test_a_sync_error_stands_when_every_member_answers_and_a_death_is_not_probed():
    first = _broadcast_error()  # e.g. a bug in the learner's send: nobody else is to blame
    probe = Probe()
    assert attribute_failure(first, probe) is first and probe.calls == 1
    dead = died("learner", 0)
    probe = Probe(died("rollout", 0))
    assert attribute_failure(dead, probe) is dead and probe.calls == 0


# The same through WeightSync itself, over fake actors and a fake of ray.wait/ray.get (no Ray started).

class Call:
    """A fake remote call: answers ``value`` (raised if an exception) ``delay`` s after it was made."""

    def __init__(self, delay: float, value) -> None:
        self.due, self.value = time.monotonic() + delay, value


class FakeActor:
    """``answers``: method -> (delay in s, value or exception); other methods answer at once."""

    def __init__(self, **answers) -> None:
        self.answers = answers

    def __getattr__(self, method: str):
        delay, value = self.answers.get(method, (0.0, {"pid": 1}))
        return SimpleNamespace(remote=lambda *args: Call(delay, value))


def _fake_wait(refs, num_returns, timeout, fetch_local):
    first = min(refs, key=lambda r: r.due)
    delay = first.due - time.monotonic()
    if delay > timeout:
        time.sleep(timeout)
        return [], list(refs)
    time.sleep(max(0.0, delay))
    return [first], [r for r in refs if r is not first]


def _fake_get(ref):
    if isinstance(ref.value, BaseException):
        raise ref.value
    return ref.value


def _weight_sync(monkeypatch, learners: list, engines: list, timeout_s: float, transport: str = "collective"):
    import ray  # inside: tests/unit collects without Ray

    from rlhf_ray.runtime.groups import LearnerGroup, WeightSync

    monkeypatch.setattr(ray, "wait", _fake_wait)
    monkeypatch.setattr(ray, "get", _fake_get)
    sync = WeightSync.__new__(WeightSync)  # its constructor plans the buckets and forms the group over Ray
    sync.cfg = SimpleNamespace(sync=SimpleNamespace(transport=transport, timeout_s=timeout_s))
    sync.learners, sync.engines, sync.buckets, sync.nbytes = LearnerGroup(learners, 30.0), engines, [], 0
    sync.partial = False
    return sync


def _task_error(method: str, cause: Exception):
    from ray.exceptions import RayTaskError

    return RayTaskError(method, f"Traceback: {cause!r}", cause)


def test_an_engine_killed_in_a_sync_is_blamed_not_learner_rank_0(monkeypatch, tmp_path):
    from ray.exceptions import RayActorError

    # Engine 1 is killed mid-broadcast: learner rank 0's send fails at once, Ray reports the death
    # later; engine 0 stays in the collective until its own wait gives up (0.6 s).
    send_failed = _task_error("broadcast_weights", RuntimeError("Connection closed by peer"))
    learners = [FakeActor(broadcast_weights=(0.05, send_failed)), FakeActor(broadcast_weights=(0.05, {"bytes": 0.0}))]
    engines = [FakeActor(receive_broadcast=(0.6, _task_error("receive_broadcast", RuntimeError("Timed out"))),
                         ping=(0.6, {"pid": 3})),
               FakeActor(receive_broadcast=(0.3, RayActorError()), ping=(0.01, RayActorError()))]
    sync = _weight_sync(monkeypatch, learners, engines, timeout_s=5.0)
    with pytest.raises(RemoteCallError) as info:
        sync.sync()
    assert (info.value.kind, info.value.source) == ("died", ("rollout", 1))  # was ("error", ("learner", 0))
    roles, coord = FakeRoles([]), FakeCoord(4)
    assert recovery(tmp_path, roles, coord).handle(info.value) == 4
    assert roles.calls == [("replace", ("rollout", 1))]


def test_an_engine_hung_in_a_sync_is_blamed_once_the_others_have_left_it(monkeypatch):
    # Engine 1 stops answering: learner rank 0's send gives up after sync.timeout_s, and so does
    # healthy engine 0's receive, which answers its ping only after that.
    timeout = 0.4
    learners = [FakeActor(broadcast_weights=(timeout, _task_error("broadcast_weights", RuntimeError("timed out"))))]
    engines = [FakeActor(receive_broadcast=(timeout, _task_error("receive_broadcast", RuntimeError("timed out"))),
                         ping=(timeout, {"pid": 3})),
               FakeActor(receive_broadcast=(math.inf, None), ping=(math.inf, None))]
    sync = _weight_sync(monkeypatch, learners, engines, timeout_s=timeout)
    with pytest.raises(RemoteCallError) as info:
        sync.sync()
    assert (info.value.kind, info.value.source) == ("timeout", ("rollout", 1))
    assert "no answer from rollout engine 1 within" in str(info.value)


def test_a_learner_lost_in_an_object_store_sync_is_blamed_not_the_engine(monkeypatch):
    from ray.exceptions import RayActorError

    # Learner rank 0 owned the arrays and died: the engine's load fails with an error first.
    learners = [FakeActor(export_arrays=(0.0, ["array"]), ping=(0.0, RayActorError()))]
    engines = [FakeActor(load_arrays=(0.05, _task_error("load_arrays", RuntimeError("owner of the object died"))))]
    sync = _weight_sync(monkeypatch, learners, engines, timeout_s=2.0, transport="object_store")
    with pytest.raises(RemoteCallError) as info:
        sync.sync()
    assert (info.value.kind, info.value.source) == ("died", ("learner", 0))


def test_a_sync_error_nobody_else_caused_stays_with_its_member(monkeypatch):
    learners = [FakeActor(broadcast_weights=(0.05, _task_error("broadcast_weights", ValueError("bad bucket plan"))))]
    engines = [FakeActor(receive_broadcast=(0.2, _task_error("receive_broadcast", RuntimeError("timed out"))),
                         ping=(0.2, {"pid": 3}))]
    sync = _weight_sync(monkeypatch, learners, engines, timeout_s=2.0)
    with pytest.raises(RemoteCallError, match="bad bucket plan") as info:
        sync.sync()
    assert (info.value.kind, info.value.source) == ("error", ("learner", 0))


def test_a_failure_while_the_learner_group_restarts_leaves_it_marked_inconsistent(tmp_path):
    # Fresh learners hold the initial model until the checkpoint is loaded: nothing may be saved
    # as the coordinator's iteration in between (Run.save_before_failing reads this).
    roles, coord = FakeRoles([]), FakeCoord(5)
    rec = recovery(tmp_path, roles, coord)
    broken = died("rollout", 0, kind="error")  # e.g. an engine raising while the sync group is rebuilt

    def restart_fails():
        roles.calls.append(("restart_learners",))
        raise broken

    roles.restart_learners = restart_fails
    with pytest.raises(RemoteCallError) as info:
        rec.handle(died("learner", 1))
    assert info.value is broken and not rec.learners_consistent
    restarted = recovery(tmp_path, FakeRoles([]), FakeCoord(5))
    assert restarted.handle(died("learner", 1)) == 0 and restarted.learners_consistent


def test_a_learner_restart_cut_short_by_a_lost_engine_still_loads_the_checkpoint(tmp_path):
    # Learner rank 1 dies; the fresh group's sync-group set-up then finds engine 0 dead. The engine
    # is replaced, and the fresh ranks (initial model) must still load the checkpoint: they used to
    # be left as they were, training on from the initial weights at the coordinator's iteration 5.
    done = tmp_path / "checkpoints" / "iter_000003"
    done.mkdir(parents=True)
    (done / "coordinator.json").write_text('{"coordinator": {"iteration": 3}}')
    (done / "COMPLETE").write_text("iteration 3\n")
    roles, coord = FakeRoles([]), FakeCoord(5)
    loaded = []
    roles.learners = SimpleNamespace(load_checkpoint=lambda path: loaded.append(path) or Done(None))
    engine_lost = died("rollout", 0)

    def restart_cut_short():
        roles.calls.append(("restart_learners",))
        raise engine_lost

    roles.restart_learners = restart_cut_short
    rec = recovery(tmp_path, roles, coord)
    assert rec.handle(died("learner", 1)) == 3
    assert roles.calls == [("restart_learners",), ("replace", ("rollout", 0))]
    assert loaded == [str(done)] and coord.iteration == 3 and rec.learners_consistent and coord.stale
    assert engine_lost.phase == "recovery"


# ---- a role lost with its node (Roles.lost_node) ------------------------------------------------

def _complete_checkpoint(run_dir, iteration: int):
    done = run_dir / "checkpoints" / f"iter_{iteration:06d}"
    done.mkdir(parents=True)
    (done / "coordinator.json").write_text(f'{{"coordinator": {{"iteration": {iteration}}}}}')
    (done / "COMPLETE").write_text(f"iteration {iteration}\n")
    return done


def _lost(replaceable: bool) -> dict:
    return {"node_id": "5e1f00d", "node_ip": "10.77.0.2", "bundle": {"CPU": 0.5, "node_b": 1.0},
            "replaceable": replaceable}


def test_a_learner_lost_with_a_node_nothing_else_can_hold_stops_naming_the_node_and_checkpoint(tmp_path):
    # Learners pinned to node B (custom resource node_b) and node B is gone: a restart would wait
    # startup_timeout_s for a bundle no live node can hold, max_learner_restarts times, and then
    # say "giving up" without naming the node or the checkpoint to resume from.
    _complete_checkpoint(tmp_path, 1)
    last = _complete_checkpoint(tmp_path, 2)
    roles = FakeRoles([], lost={("learner", 0): _lost(replaceable=False)})
    first = died("learner", 0)
    first.phase = "update"
    with pytest.raises(NodeLostError) as info:
        recovery(tmp_path, roles, FakeCoord(3)).handle(first)
    message = str(info.value)
    assert message.startswith("node 10.77.0.2 (Ray node 5e1f00d) was lost with learner rank 0 on it")
    assert "asks for ({CPU: 0.5, node_b: 1})" in message and "--resources.learner" in message
    assert f"Last checkpoint: {last}" in message and f"--resume {last}" in message
    assert "learner rank 0 died in 'a call', phase update" in message
    assert roles.calls == [] and info.value.__cause__ is first  # nothing restarted


def test_a_node_lost_before_any_checkpoint_says_so(tmp_path):
    roles = FakeRoles([], lost={("rollout", 0): _lost(replaceable=False)})
    with pytest.raises(NodeLostError, match=r"No checkpoint was written before the loss \(--checkpoint.every\)"):
        recovery(tmp_path, roles, FakeCoord(1)).handle(died("rollout", 0))
    assert roles.calls == []


def test_a_role_lost_with_a_node_is_restarted_when_the_nodes_left_can_hold_it(tmp_path):
    said = []
    roles = FakeRoles([], lost={("learner", 1): _lost(replaceable=True)})
    rec = Recovery(SimpleNamespace(resources=SimpleNamespace(max_actor_restarts=3, max_learner_restarts=2)), roles,
                   FakeCoord(4), str(tmp_path), {"iteration": 0}, say=said.append)
    assert rec.handle(died("learner", 1)) == 0
    assert roles.calls == [("restart_learners",)]
    assert "lost with node 10.77.0.2, which the nodes left can replace" in said[0]


def test_roles_report_a_dead_node_and_whether_a_live_one_fits_the_role(monkeypatch):
    import ray  # inside: tests/unit collects without Ray

    from rlhf_ray.config import config_from_dict
    from rlhf_ray.runtime.groups import Roles

    cfg = config_from_dict({"resources": {"learner": {"num_cpus": 0.5, "custom": {"node_b": 1}},
                                          "rollout": {"num_cpus": 0.5}}})
    roles = Roles.__new__(Roles)  # its constructor starts actors over Ray
    roles.cfg = cfg
    roles.placement = {"learner rank 0": {"node_id": "b", "node_ip": "10.77.0.2"},
                       "rollout engine 0": {"node_id": "b", "node_ip": "10.77.0.2"},
                       "reward": {"node_id": "a", "node_ip": "10.77.0.1"}}
    nodes = [{"NodeID": "a", "Alive": True, "NodeManagerAddress": "10.77.0.1",
              "Resources": {"CPU": 2.0, "node_a": 4.0}},
             {"NodeID": "b", "Alive": False, "NodeManagerAddress": "10.77.0.2",
              "Resources": {"CPU": 2.0, "node_b": 4.0}}]
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    assert roles.lost_node(("learner", 0)) == {"node_id": "b", "node_ip": "10.77.0.2",
                                               "bundle": {"CPU": 0.5, "node_b": 1.0}, "replaceable": False}
    assert roles.lost_node(("rollout", 0))["replaceable"] is True  # node A has the CPU it asks for
    assert roles.lost_node(("reward", 0)) is None  # its node is alive
    nodes[1]["Alive"] = True
    assert roles.lost_node(("learner", 0)) is None
