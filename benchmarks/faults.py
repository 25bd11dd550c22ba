"""Fault injection in one demo-sized run: which role is killed when, how long the run takes to
recover, and whether any sample is lost or counted twice.

    python -m benchmarks.faults [--iterations 120] [--checkpoint-every 20]

One PPO run (configs/demo_cpu.yaml's sizes on the tiny Llama, eager engine, local Ray cluster)
with SIGKILLs of the roles' processes at chosen iterations (default: rollout engine 0 after 30
iterations, learner rank 1 after 65, the reward actor after 90, the reference after 100). A
watcher timestamps every new line of metrics.jsonl. For each fault:

* recovery: seconds from the kill until the run has again completed as many iterations as it had
  when the process was killed, plus one (for a learner, the iterations since its last checkpoint
  are redone inside that time), next to the median iteration time;
* iterations redone: how far back the run went (0 for an engine, the reference or the reward actor:
  the failed iteration is redone with the same prompts).

At the end metrics.jsonl must hold every iteration exactly once with the full number of samples:
the samples lost and duplicated are counted from it. Saves benchmarks/results/faults.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import tempfile
import threading
import time

from benchmarks._env import bench_config, print_table, save_results, start_ray, tiny_model


class Watcher:
    """Timestamps metrics.jsonl's lines and kills roles by plan: [(after n rows, label), ...]."""

    def __init__(self, run_dir: str, plan: list[tuple[int, str]]) -> None:
        self.run_dir, self.plan = run_dir, plan
        self.seen: list[tuple[float, int]] = []  # (time, iteration) of each new line
        self.kills: list[dict] = []
        self.stop = False
        self.thread = threading.Thread(target=self._work, daemon=True)

    def _rows(self) -> list[dict]:
        path = os.path.join(self.run_dir, "metrics.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as fh:
            lines = fh.read().splitlines()
        rows = []
        for line in lines:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # being written
                pass
        return rows

    def _work(self) -> None:
        plan, count = list(self.plan), 0
        while not self.stop:
            rows = self._rows()
            if len(rows) != count:
                now = time.time()
                self.seen += [(now, r["iteration"]) for r in rows[count:]] if len(rows) > count else []
                count = len(rows)
            if plan and count >= plan[0][0]:
                n, label = plan.pop(0)
                with open(os.path.join(self.run_dir, "placement.json")) as fh:
                    pid = json.load(fh)[label]["pid"]
                os.kill(pid, signal.SIGKILL)
                self.kills.append({"role": label, "after_iterations": n, "time": time.time(),
                                   "completed_then": max((it for _, it in self.seen), default=-1) + 1})
            time.sleep(0.05)


def recovery(kill: dict, seen: list[tuple[float, int]]) -> tuple[float, int]:
    """(seconds until iteration completed_then is done after the kill, iterations redone)."""
    after = [(t, it) for t, it in seen if t > kill["time"]]
    target = kill["completed_then"]
    done = next((t for t, it in after if it >= target), float("nan"))
    first_after = after[0][1] if after else target
    return done - kill["time"], max(0, target - first_after)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=120)
    parser.add_argument("--checkpoint-every", type=int, default=20)
    parser.add_argument("--plan", default="30:rollout engine 0,65:learner rank 1,90:reward,100:reference",
                        help="comma-separated after-n-iterations:role-label (labels as in placement.json)")
    parser.add_argument("--name", default="faults")
    args = parser.parse_args(argv)
    plan = [(int(p.split(":", 1)[0]), p.split(":", 1)[1]) for p in args.plan.split(",")]

    from rlhf_ray.coordinator.run import run

    run_dir = tempfile.mkdtemp(prefix="faults-")
    cfg = bench_config(tiny_model(), **{"ppo.iterations": args.iterations, "checkpoint.every": args.checkpoint_every,
                                        "logging.run_dir": run_dir, "rollout.vllm.enforce_eager": True,
                                        "sync.timeout_s": 60, "resources.call_timeout_s": 120})
    start_ray()
    watcher = Watcher(run_dir, plan)
    watcher.thread.start()
    t0 = time.time()
    summary = run(cfg, run_dir)
    watcher.stop = True
    watcher.thread.join(timeout=5)
    wall = time.time() - t0

    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    iterations = [r["iteration"] for r in rows]
    expected = cfg.rollout.prompts_per_iteration * cfg.rollout.samples_per_prompt
    missing = sorted(set(range(args.iterations)) - set(iterations))
    duplicated = len(iterations) - len(set(iterations))
    samples_lost = len(missing) * expected + sum(max(0, expected - int(r["samples"])) for r in rows)
    samples_doubled = duplicated * expected
    step_times = [r["time/iteration"] for r in rows]
    median_it = statistics.median(step_times)
    table = []
    for kill in watcher.kills:
        seconds, redone = recovery(kill, watcher.seen)
        table.append({"fault": f"SIGKILL {kill['role']}", "after_iteration": kill["after_iterations"],
                      "recovery_s": round(seconds, 1), "iterations_redone": redone,
                      "median_iteration_s": round(median_it, 3)})
    print_table(table, title=f"{args.iterations} iterations, checkpoint every {args.checkpoint_every}")
    print(f"completed {summary['completed']}: {len(set(iterations))} iterations in metrics.jsonl, each once "
          f"({duplicated} duplicated, {len(missing)} missing); samples lost {samples_lost}, counted twice "
          f"{samples_doubled}; restarts: actors {rows[-1]['faults/actor_restarts']:.0f}, learner group "
          f"{rows[-1]['faults/learner_restarts']:.0f}; wall {wall:.0f} s")
    save_results(args.name, {"args": vars(args), "faults": table, "run_dir": run_dir, "wall_s": wall,
                             "completed": summary["completed"], "iterations_missing": missing,
                             "iterations_duplicated": duplicated},
                 {"samples_lost": samples_lost, "samples_doubled": samples_doubled,
                  "recovery_s": [t["recovery_s"] for t in table], "completed": summary["completed"]})
    return 0 if summary["completed"] and not samples_lost and not samples_doubled else 1


if __name__ == "__main__":
    raise SystemExit(main())
