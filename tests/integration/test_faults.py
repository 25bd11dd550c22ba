"""Fault injection on the local cluster: killed actors are replaced and the run completes with
every iteration exactly once; NaN rewards are quarantined; a hung role times out instead of
hanging the run.

Starting the roles costs most of each run, so tests that need the same roles and config share one
run (a module-scoped fixture) and check it separately."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import pytest

from tests.integration.conftest import small_config

pytestmark = pytest.mark.integration


def _rows(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def _kill_after(run_dir: str, plan: list[tuple[int, str]]) -> threading.Thread:
    """Kill the process of role ``label`` (as named in placement.json) once ``n`` iterations
    are in metrics.jsonl, for each (n, label) in order."""

    def work():
        for n, label in plan:
            deadline = time.time() + 300
            while time.time() < deadline:
                path = os.path.join(run_dir, "metrics.jsonl")
                if os.path.exists(path) and len(open(path).read().splitlines()) >= n:
                    break
                time.sleep(0.2)
            with open(os.path.join(run_dir, "placement.json")) as fh:
                pid = json.load(fh)[label]["pid"]
            os.kill(pid, signal.SIGKILL)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread


@pytest.fixture(scope="module")
def killed_roles_run(ray_cluster, tiny_llama, tmp_path_factory) -> tuple[dict, list[dict]]:
    """One run for the two tests below (the same roles, the same config): rollout engine 0, the
    reference and the reward actor are killed once 1, 2 and 3 iterations are logged, learner rank 1
    once 4 are (a checkpoint after every iteration). Returns the summary and the metrics rows."""
    from rlhf_ray.coordinator.run import run

    run_dir = str(tmp_path_factory.mktemp("killed") / "run")
    cfg = small_config(tiny_llama, **{"ppo.iterations": 6, "checkpoint.every": 1, "sync.timeout_s": 60,
                                      "resources.call_timeout_s": 120})
    os.makedirs(run_dir)
    killer = _kill_after(run_dir, [(1, "rollout engine 0"), (2, "reference"), (3, "reward"), (4, "learner rank 1")])
    summary = run(cfg, run_dir)
    killer.join(timeout=5)
    return summary, _rows(run_dir)


def test_killed_engine_reference_and_reward_are_replaced(killed_roles_run):
    summary, rows = killed_roles_run
    assert summary["completed"] and summary["final_iteration"] == 6
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4, 5]  # each once: nothing lost or doubled
    assert all(r["samples"] == 16 for r in rows)
    assert rows[-1]["faults/actor_restarts"] == 3
    # the replacement engine received the current policy: vLLM and learner agree again
    assert all(r["logprob_mismatch_max"] < 2e-3 for r in rows)


def test_killed_learner_restarts_group_from_checkpoint(killed_roles_run):
    summary, rows = killed_roles_run
    assert summary["completed"]
    assert rows[-1]["faults/learner_restarts"] == 1
    assert all(r["logprob_mismatch_max"] < 2e-3 for r in rows)
    # The first iteration run by the restarted group already starts away from the reference
    # (it would be exactly 0 had the group restarted from model.path instead of the checkpoint).
    first_after = next(r for r in rows if r["faults/learner_restarts"] == 1)
    assert first_after["iteration"] >= 1 and first_after["kl_k2_mean"] > 1e-6


@pytest.fixture(scope="module")
def bad_rewards_run(ray_cluster, tiny_llama, tmp_path_factory) -> tuple[str, Exception | None]:
    """One run for the two tests below: the reward function gives NaN for every 4th sample of the
    first two batches (iterations 0 and 1), then inf for every sample, with
    ppo.max_bad_iterations 2. Returns the run directory and what the run raised."""
    from rlhf_ray.coordinator.run import run

    tmp = tmp_path_factory.mktemp("bad_rewards")
    fn = tmp / "nan_reward.py"
    fn.write_text("import math\n"
                  "BATCHES = 0\n"
                  "def nan_then_inf(prompts, responses):\n"
                  "    global BATCHES\n"
                  "    if len(responses) > 2:  # a batch, not the start-up probe's two responses\n"
                  "        BATCHES += 1\n"
                  "    if BATCHES <= 2:\n"
                  "        return [math.nan if i % 4 == 0 else 1.0 for i in range(len(responses))]\n"
                  "    return [math.inf] * len(responses)\n")
    run_dir = str(tmp / "run")
    try:
        run(small_config(tiny_llama, **{"reward.function": f"{fn}:nan_then_inf", "ppo.iterations": 5,
                                        "ppo.max_bad_iterations": 2}), run_dir)
    except Exception as exc:  # noqa: BLE001 - the test below checks what it was
        return run_dir, exc
    return run_dir, None


def test_nan_rewards_are_quarantined(bad_rewards_run):
    run_dir, _ = bad_rewards_run
    rows = [r for r in _rows(run_dir) if r["iteration"] < 2]
    assert [r["iteration"] for r in rows] == [0, 1]
    for r in rows:
        assert r["skipped_samples"] == 4
        assert r["reward_mean"] == 1.0  # the mean is over usable samples only
        assert math.isfinite(r["policy_loss"]) and math.isfinite(r["value_loss"])


def test_all_nan_rewards_stop_the_run(bad_rewards_run):
    from rlhf_ray.coordinator.loop import NonFiniteError

    run_dir, error = bad_rewards_run
    # iterations 2 and 3 had no usable sample (a usable one in between would have reset the count)
    assert isinstance(error, NonFiniteError), repr(error)
    assert "2 consecutive iterations had no usable sample" in str(error)
    # The learner was never updated with a bad batch: the last completed iteration is saved first.
    assert os.path.isfile(os.path.join(run_dir, "checkpoints", "iter_000003", "COMPLETE"))
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "iter_000004"))


def test_hung_reward_times_out_instead_of_hanging(ray_cluster, tiny_llama, tmp_path):
    from rlhf_ray.coordinator.run import run

    fn = tmp_path / "slow_reward.py"
    # answers the two-response probe before Ray starts, then hangs on real batches
    fn.write_text("import time\ndef slow(prompts, responses):\n    if len(responses) > 2:\n        time.sleep(600)\n"
                  "    return [0.0] * len(responses)\n")
    cfg = small_config(tiny_llama, **{"reward.function": f"{fn}:slow", "ppo.iterations": 2,
                                      "resources.call_timeout_s": 8, "resources.max_actor_restarts": 1})
    t0 = time.time()
    with pytest.raises(RuntimeError, match=r"giving up after 1 actor replacements.*reward.*no answer .* within 8 s"):
        run(cfg, str(tmp_path / "run"))
    assert time.time() - t0 < 180


def test_a_dead_member_leaves_the_others_answering_at_once(ray_cluster):
    """One member of a multi-actor call dies: the call fails at once, and the healthy member's
    next call answers at once. (RayPending used to ``ray.cancel`` the unanswered calls; cancelling
    one that Ray had not yet delivered left a hole in that actor's call sequence, so its next call
    waited 30 s and failed: in CI the learner's ping after an engine died in a weight sync.)"""
    from rlhf_ray.runtime.pending import RayPending, RemoteCallError

    ray = ray_cluster

    @ray.remote(num_cpus=0)
    class Member:
        def echo(self, x):
            return x

        def die(self):
            os._exit(1)

    @ray.remote(num_cpus=0)
    def slow_argument():
        time.sleep(2)
        return "arg"

    healthy, doomed = Member.remote(), Member.remote()
    assert ray.get([healthy.echo.remote(0), doomed.echo.remote(0)]) == [0, 0]
    # The healthy member's call waits for its argument, so it is not yet delivered when the other dies.
    refs = [healthy.echo.remote(slow_argument.remote()), doomed.die.remote()]
    t0 = time.monotonic()
    with pytest.raises(RemoteCallError, match="rollout engine 1 died"):
        RayPending(refs, [("rollout", 0), ("rollout", 1)], "weight sync", 30).result()
    assert time.monotonic() - t0 < 20
    t0 = time.monotonic()
    assert ray.get(healthy.echo.remote("next"), timeout=20) == "next"
    assert time.monotonic() - t0 < 10
    assert ray.get(refs[0], timeout=20) == "arg"  # the unanswered call was left to finish



def test_engines_killed_or_hung_in_the_middle_of_a_sync_are_replaced(ray_cluster, tiny_llama, tmp_path, capsys):
    """Learner rank 0 is listed first in the sync, and an engine that dies while receiving makes its
    broadcast raise before Ray reports the death: that used to end the run as a learner *error*; an
    engine that hangs there made the sync time out on learner rank 0 and restarted the learner group.
    Each engine is frozen (SIGSTOP) while the driver writes the checkpoint that precedes the next
    sync, so the sync is under way when it fails (gloo's send waits for its receiver): engine 0 is
    then killed, engine 1 left frozen. Both are replaced, the learner group never restarts."""
    from rlhf_ray.coordinator.run import run

    run_dir = str(tmp_path / "run")
    # checkpoint.every 1: the driver writes a checkpoint after each iteration's record and before
    # the next sync, the window in which an idle engine is frozen.
    cfg = small_config(tiny_llama, **{"ppo.iterations": 5, "rollout.num_engines": 2, "checkpoint.every": 1,
                                      "sync.timeout_s": 10, "resources.call_timeout_s": 120})
    os.makedirs(run_dir)

    def wait_for(ready) -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not ready():
            time.sleep(0.02)

    def freeze_kill_freeze():
        metrics = os.path.join(run_dir, "metrics.jsonl")
        wait_for(lambda: os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 2)
        with open(os.path.join(run_dir, "placement.json")) as fh:
            placement = json.load(fh)
        pids = [placement[f"rollout engine {i}"]["pid"] for i in (0, 1)]
        os.kill(pids[0], signal.SIGSTOP)
        wait_for(lambda: os.path.exists(os.path.join(run_dir, "checkpoints", "iter_000002", "COMPLETE")))
        time.sleep(3)  # the sync began after the checkpoint: learner rank 0 waits on the frozen engine
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: len(open(metrics).read().splitlines()) >= 4)
        os.kill(pids[1], signal.SIGSTOP)  # frozen for good: the run must find it, and kill it

    killer = threading.Thread(target=freeze_kill_freeze, daemon=True)
    killer.start()
    summary = run(cfg, run_dir)
    killer.join(timeout=5)
    out = capsys.readouterr().out
    assert "rollout engine 0 died (phase sync); replacing it and redoing iteration 2" in out, out[-3000:]
    assert "rollout engine 1 timeout (phase sync); replacing it and redoing iteration 4" in out, out[-3000:]
    assert summary["completed"]
    rows = _rows(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4]  # 4: the last, run by both new engines
    assert rows[-1]["faults/actor_restarts"] == 2 and rows[-1]["faults/learner_restarts"] == 0
    assert all(r["logprob_mismatch_max"] < 2e-3 for r in rows)  # the new engines got the current policy
