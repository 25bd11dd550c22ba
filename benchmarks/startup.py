"""Where a run's start-up goes: from the launcher's start to the first iteration, per phase.

    python -m benchmarks.startup [--set rollout.vllm.enforce_eager=true ...] [--name startup]

Runs the demo config's start-up as ``python -m rlhf_ray.launch`` does (imports, inputs, Ray,
roles, coordinator; the same ``StartupClock``), then asks Ray's state API when each actor's
creation task was queued, started running its constructor and finished, and how long each
start-up call (learner set-up with DeepSpeed, weight-sync group) ran; then one weight sync and
one iteration. Timings on a shared machine vary by tens of percent: the load average is saved.
"""

from __future__ import annotations

STARTED_AT = __import__("time").perf_counter()

import argparse  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402

from benchmarks import _env  # noqa: E402


def _events(task: dict) -> dict[str, float]:
    """state -> first time (s since epoch) of a task's state transitions."""
    out: dict[str, float] = {}
    for ev in task.get("events") or []:
        out.setdefault(ev["state"], ev["created_ms"] / 1000.0)
    return out


def actor_phases(t_roles_start: float, dashboard: str) -> dict[str, dict[str, float]]:
    """Per actor creation task and per start-up method call: seconds from the roles phase's start
    to submission, to running (a worker process started and imported the class), to finished."""
    from ray.util.state import list_tasks

    rows: dict[str, dict[str, float]] = {}
    counts: dict[str, int] = defaultdict(int)
    for task in list_tasks(address=dashboard, detail=True, limit=1000, raise_on_missing_output=False):
        name = task.get("func_or_class_name") or task.get("name")
        ev = _events(task)
        if "RUNNING" not in ev or "FINISHED" not in ev:
            continue
        key = f"{name}#{counts[name]}"
        counts[name] += 1
        submitted = ev.get("PENDING_NODE_ASSIGNMENT", ev.get("PENDING_ARGS_AVAIL", ev["RUNNING"]))
        rows[key] = {"submitted_at": round(submitted - t_roles_start, 2),
                     "running_at": round(ev["RUNNING"] - t_roles_start, 2),
                     "finished_at": round(ev["FINISHED"] - t_roles_start, 2),
                     "wait_for_worker_s": round(ev["RUNNING"] - submitted, 2),
                     "run_s": round(ev["FINISHED"] - ev["RUNNING"], 2)}
    return dict(sorted(rows.items(), key=lambda kv: kv[1]["running_at"]))


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds a live process has used (Linux /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return round((int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), 2)
    except (OSError, IndexError, ValueError):
        return None


def ray_system_cpu() -> dict[str, float]:
    """CPU seconds of the local cluster's own processes (GCS, raylet, dashboard, agents, idle workers)."""
    from ray._private.worker import global_worker

    out: dict[str, float] = defaultdict(float)
    node = global_worker.node
    for kind, infos in node.all_processes.items():
        for info in infos:
            cpu = cpu_seconds(info.process.pid)
            if cpu is not None:
                out[kind] += cpu
    return dict(out)


def idle_workers() -> list[int]:
    """Pids of this node's idle Ray workers (children of its raylet named ray::IDLE)."""
    from ray._private.worker import global_worker

    raylets = {info.process.pid for info in global_worker.node.all_processes.get("raylet", [])}
    out = []
    for pid in os.popen("pgrep -f 'ray::IDLE'").read().split():
        try:
            with open(f"/proc/{pid}/stat") as fh:
                if int(fh.read().rsplit(")", 1)[1].split()[1]) in raylets:
                    out.append(int(pid))
        except (OSError, ValueError, IndexError):
            pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--name", default="startup")
    args = parser.parse_args()

    import ray

    from rlhf_ray.config import load_config
    from rlhf_ray.coordinator.loop import PPOCoordinator
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.coordinator.startup import StartupClock
    from rlhf_ray.runtime import quiet
    from rlhf_ray.runtime.cluster import start_ray
    from rlhf_ray.runtime.groups import Roles, SharedBatch

    overrides = dict(kv.split("=", 1) for kv in args.set)
    cfg = load_config(str(_env.DEMO_CONFIG), {"eval.every": "0", "logging.tensorboard": "false", **overrides})
    load = _env.loadavg()
    run_dir = tempfile.mkdtemp(prefix="startup-")
    clock = StartupClock(STARTED_AT)
    inputs = prepare_inputs(cfg)
    clock.lap("inputs")
    where = start_ray(None, "rlhf_ray-startup-bench")
    quiet.install(run_dir)
    clock.lap("ray")
    t_roles = time.time()
    roles = Roles(cfg)
    clock.lap("roles")
    role_cpu = {name: cpu_seconds(p["pid"]) for name, p in roles.placement.items()}
    system_cpu = ray_system_cpu()
    idle = idle_workers()
    idle_cpu = sum(c for c in (cpu_seconds(pid) for pid in idle) if c is not None)
    try:
        coord = PPOCoordinator(cfg, inputs.prompts, inputs.pad_id, inputs.eos_ids, roles.rollout, roles.reference,
                               roles.reward, roles.learners, roles.weight_sync, put=SharedBatch)
        clock.lap("coordinator")
        t0 = time.perf_counter()
        roles.weight_sync.sync()
        first_sync = time.perf_counter() - t0
        t0 = time.perf_counter()
        coord.step()
        first_iteration = time.perf_counter() - t0
        time.sleep(2)  # task events reach the GCS in batches
        phases = actor_phases(t_roles, where["dashboard"])
    finally:
        roles.shutdown()
    print(clock.line())
    print(f"first weight sync {first_sync:.2f} s, first iteration {first_iteration:.2f} s")
    print(f"{'task':<42} {'submitted':>9} {'running':>8} {'done':>7} {'wait':>6} {'run':>6}   (s from the roles phase's start)")
    for name, r in phases.items():
        print(f"{name:<42} {r['submitted_at']:>9.1f} {r['running_at']:>8.1f} {r['finished_at']:>7.1f} "
              f"{r['wait_for_worker_s']:>6.1f} {r['run_s']:>6.1f}")
    print("CPU seconds used by the end of the roles phase: "
          + ", ".join(f"{k} {v}" for k, v in role_cpu.items())
          + f"; Ray's own processes {round(sum(system_cpu.values()), 1)} ({dict(system_cpu)}); "
          + f"{len(idle)} idle Ray workers {round(idle_cpu, 1)}")
    payload = {"overrides": overrides, "role_cpu_s": role_cpu, "ray_system_cpu_s": system_cpu,
               "idle_workers": len(idle), "idle_workers_cpu_s": idle_cpu, "phases_s": clock.phases, "total_s": clock.last - clock.t0,
               "first_sync_s": first_sync, "first_iteration_s": first_iteration, "tasks": phases,
               "loadavg_at_start": load, "loadavg_at_end": _env.loadavg()}
    _env.save_results(args.name, payload, {"startup_s": round(clock.last - clock.t0, 1),
                                           "roles_s": round(clock.phases["roles"], 1)})
    ray.shutdown()


if __name__ == "__main__":
    main()
