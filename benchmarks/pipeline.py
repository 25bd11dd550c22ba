"""The asynchronous pipeline (``rollout.max_staleness``): time per iteration at staleness 0, 1, 2
and 4 beside its phases' sum and maximum, a timeline of who waits for whom, and reward curves.

What it runs, in one invocation, on one private local Ray cluster (the real roles: one vLLM
engine, reference, reward, two DeepSpeed ZeRO-2 learner ranks; each run starts them anew and
steps ``PPOCoordinator`` directly, no run directory):

* ``--part throughput`` (default): the demo task (configs/demo_cpu.yaml, 8 prompts x 8 samples,
  16 new tokens) on two kinds of phases: ``latency``, scored by ``benchmarks/slow_judge.py``
  (every call waits 50 ms like a remote judge; 4 samples per call, 2 calls at once: 16 calls, ~0.4
  s a batch) and ``cpu`` (the demo's own reward function: every phase is CPU work on the same 2
  cores). Per task and staleness, ``--iters`` iterations (the first ``--warmup`` left out): mean
  seconds per iteration and samples/s, and the mean of each phase (generate, score, old_logprobs
  (on-policy inside score), advantages, update, sync), their sum and their max; the goal on the
  latency task is an iteration within 1.15x of the slowest phase at staleness >= 1. The timeline
  figure (``pipeline_timeline.png``) draws ``--timeline-iters`` iterations of the latency task at
  staleness 0 and 2 from the recorded phase events (``timeline`` in each iteration's metrics).
  ``--tasks long`` (96 new tokens: generation the slowest phase) with ``--partial 0,24`` times
  partial rollouts: each staleness >= 1 once per rollout.partial_rollout_tokens.
* ``--part curves``: reward curves, ``--seeds`` seeds each, for staleness 0, 1, 2, 4 (the off-policy
  correction at its default, tis) and 4 with the correction off, on the demo task and on the words
  task (``rlhf_ray.rewards:word_count_target``); mean reward of the last 10 iterations per setting
  (mean and spread over seeds) and ``pipeline_curves.png``.

Results: benchmarks/results/<name>.json (default ``pipeline`` / ``pipeline_curves``), the figures
beside it, a line in history.jsonl. This VM drifts by tens of percent and has 2 cores: compare
figures within one invocation only, and read the cpu task's as what overlapping CPU work on 2
cores can give (little).

Measured (benchmarks/results/pipeline.json, 2026-12-08 at a1e1fe7, throughput part, latency and
cpu tasks): latency task 0.763 s/it on-policy -> 0.671 / 0.477 / 0.479 at staleness 1 / 2 / 4
(1.00x the slowest phase at 2 and 4); cpu task 0.391 -> 0.335 / 0.303 / 0.292.

Run (repository root):
    .venv/bin/python -m benchmarks.pipeline                         # ~8 runs, ~6 min
    .venv/bin/python -m benchmarks.pipeline --part curves --iters 50  # 30 runs, ~35 min
    .venv/bin/python -m benchmarks.pipeline --tasks long --staleness 0,2 --partial 0,24 --name pipeline_partial
    .venv/bin/python -m benchmarks.pipeline --iters 8 --staleness 0,2 --tasks latency --name pipeline_smoke
"""

from __future__ import annotations

import argparse
import time
import traceback
from typing import Any

from benchmarks import _env

PHASES = ("generate", "score", "old_logprobs", "advantages", "update", "sync")
JUDGE = str(_env.ROOT / "benchmarks" / "slow_judge.py") + ":judge"
TASKS = {
    "latency": {"reward.function": JUDGE, "reward.samples_per_call": 4, "reward.concurrency": 2},
    "cpu": {},
    "long": {"rollout.max_new_tokens": 96, "rollout.max_model_len": 160},  # generation-bound
    "digits": {},
    "words": {"reward.function": "rlhf_ray.rewards:word_count_target"},
}
SETTINGS = {"k0": {"rollout.max_staleness": 0}, "k1": {"rollout.max_staleness": 1},
            "k2": {"rollout.max_staleness": 2}, "k4": {"rollout.max_staleness": 4},
            "k4_no_correction": {"rollout.max_staleness": 4, "ppo.rollout_correction": "none"}}


def config(model: str, task: str, overrides: dict, seed: int, iterations: int):
    return _env.bench_config(model, **{"seed": seed, "ppo.iterations": iterations, "eval.every": 0,
                                       "checkpoint.every": 0, "sync.check_logprobs_every": 0,
                                       **TASKS[task], **overrides})


def steps(cfg, iterations: int) -> tuple[list[dict], str | None]:
    from benchmarks.ppo_throughput import coordinator_steps

    try:
        return coordinator_steps(cfg, iterations), None
    except Exception as exc:  # keep the other runs; the JSON says what failed
        error = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        print(f"!!! failed: {error}", flush=True)
        return [], error


def throughput_row(task: str, k: int, rows: list[dict], warmup: int) -> dict[str, Any]:
    timed = rows[warmup:]
    it = _env.mean([r["time/iteration"] for r in timed])
    phases = {p: _env.mean([r.get(f"time/{p}", 0.0) for r in timed]) for p in PHASES}
    slowest = max(phases, key=phases.get)
    return {"task": task, "max_staleness": k, "s_per_iteration": it,
            "samples_per_s": _env.mean([r["samples"] for r in timed]) / it,
            "phases_s": phases, "phase_sum_s": sum(phases.values()), "phase_max_s": phases[slowest],
            "slowest_phase": slowest, "iteration_over_slowest_phase": it / phases[slowest],
            "wait_batch_s": _env.mean([r.get("time/wait_batch", 0.0) for r in timed]),
            "staleness_mean": _env.mean([r.get("staleness/mean", 0.0) for r in timed]),
            "staleness_max": max((r.get("staleness/max", 0.0) for r in timed), default=0.0),
            "spanning_samples": _env.mean([r.get("staleness/spanning_samples", 0.0) for r in timed]),
            "reward_curve": [r["reward_mean"] for r in rows]}


def timeline_events(rows: list[dict], first: int, count: int) -> list[list]:
    """The events of iterations ``first`` .. ``first + count - 1``, shifted to start at 0."""
    events = [e for r in rows[first:first + count] for e in r["timeline"]]
    t0 = min(e[2] for e in events)
    return [[lane, label, start - t0, end - t0] for lane, label, start, end in events]


def plot_timeline(timelines: dict[str, list[list]], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = ["engines", "reference+reward", "learner", "sync", "coordinator"]
    colours = {"engines": "tab:blue", "reference+reward": "tab:orange", "learner": "tab:green", "sync": "tab:red",
               "coordinator": "tab:gray"}
    fig, axes = plt.subplots(len(timelines), 1, figsize=(11, 2.2 * len(timelines)), squeeze=False)
    end = max(e[3] for events in timelines.values() for e in events)
    for ax, (title, events) in zip(axes[:, 0], timelines.items()):
        for lane_i, lane in enumerate(lanes):
            bars = [(e[2], e[3] - e[2]) for e in events if e[0] == lane]
            ax.broken_barh(bars, (lane_i - 0.4, 0.8), facecolors=colours[lane], edgecolor="black", linewidth=0.3)
        ax.set_yticks(range(len(lanes)), lanes)
        ax.set_xlim(0, end)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
    axes[-1, 0].set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curves(runs: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = sorted({r["task"] for r in runs})
    fig, axes = plt.subplots(1, len(tasks), figsize=(6 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        for setting in SETTINGS:
            curves = [r["reward_curve"] for r in runs if r["task"] == task and r["setting"] == setting
                      and r["reward_curve"]]
            if not curves:
                continue
            n = min(len(c) for c in curves)
            arr = np.array([c[:n] for c in curves])
            smooth = np.array([np.convolve(c, np.ones(5) / 5, mode="valid") for c in arr])
            x = np.arange(smooth.shape[1]) + 4
            line, = ax.plot(x, smooth.mean(0), label=setting, linestyle="--" if "no_correction" in setting else "-")
            ax.fill_between(x, smooth.min(0), smooth.max(0), color=line.get_color(), alpha=0.15)
        ax.set_title(f"{task}: reward (5-iteration mean; band: seeds' min..max)", fontsize=9)
        ax.set_xlabel("iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_throughput(args, model: str) -> None:
    out: list[dict] = []
    timelines: dict[str, list[list]] = {}
    errors = []
    partials = [int(x) for x in args.partial.split(",")]
    runs = [(task, k, n) for task in args.tasks.split(",") for k in [int(x) for x in args.staleness.split(",")]
            for n in (partials if k else [0])]
    for task, k, n in runs:
        print(f"=== {task}, max_staleness {k}, partial rollouts {n or 'off'}: {args.iters} iterations", flush=True)
        rows, error = steps(config(model, task, {"rollout.max_staleness": k, "rollout.partial_rollout_tokens": n},
                                   0, args.iters), args.iters)
        if error:
            errors.append(f"{task} k={k} partial {n}: {error}")
            continue
        row = {**throughput_row(task, k, rows, args.warmup), "partial_rollout_tokens": n}
        out.append(row)
        print(f"    {row['s_per_iteration']:.3f} s/it, {row['samples_per_s']:.1f} samples/s; phases sum "
              f"{row['phase_sum_s']:.3f} s, max {row['phase_max_s']:.3f} s ({row['slowest_phase']}); "
              f"iteration / slowest phase {row['iteration_over_slowest_phase']:.2f}", flush=True)
        if task == "latency" and k in (0, 2) and n == 0:
            first = min(len(rows) - args.timeline_iters, max(args.warmup, len(rows) // 2))
            timelines[f"latency task, max_staleness {k}: iterations {first}..{first + args.timeline_iters - 1}"] = \
                timeline_events(rows, first, args.timeline_iters)
    _env.print_table([{"task": r["task"], "k": r["max_staleness"], "partial": r["partial_rollout_tokens"],
                       "s/it": r["s_per_iteration"], "sync": r["phases_s"]["sync"],
                       "samples/s": r["samples_per_s"], "phase sum": r["phase_sum_s"], "phase max": r["phase_max_s"],
                       "slowest": r["slowest_phase"], "it/max": r["iteration_over_slowest_phase"],
                       "wait batch": r["wait_batch_s"], "staleness mean": r["staleness_mean"]} for r in out],
                     title=f"\n{args.iters} iterations each (timing: mean after {args.warmup})")
    figure = plot_timeline(timelines, str(_env.RESULTS_DIR / f"{args.name}_timeline.png")) if timelines else None
    if errors:
        print("\nnot saved: " + "\n".join(errors), flush=True)
        raise SystemExit(1)
    tag = lambda r: f"{r['task']}_k{r['max_staleness']}" + (f"_p{r['partial_rollout_tokens']}"  # noqa: E731
                                                             if r["partial_rollout_tokens"] else "")
    key = {f"{tag(r)}_s_per_it": round(r["s_per_iteration"], 3) for r in out}
    key.update({f"{tag(r)}_over_slowest": round(r["iteration_over_slowest_phase"], 2) for r in out})
    _env.save_results(args.name, {"args": vars(args), "tasks": TASKS, "runs": out, "timelines": timelines,
                                  "figure": figure and figure.replace(str(_env.ROOT) + "/", "")}, key)


def run_curves(args, model: str) -> None:
    runs: list[dict] = []
    settings = args.settings.split(",")
    for seed in [int(s) for s in args.seeds.split(",")]:
        for task in args.tasks.split(","):
            for setting in settings:
                print(f"=== {task} / {setting} / seed {seed}: {args.iters} iterations", flush=True)
                t0 = time.perf_counter()
                rows, error = steps(config(model, task, SETTINGS[setting], seed, args.iters), args.iters)
                curve = [r["reward_mean"] for r in rows]
                runs.append({"task": task, "setting": setting, "seed": seed, "error": error, "reward_curve": curve,
                             "staleness_mean": _env.mean([r.get("staleness/mean", 0.0) for r in rows]),
                             "kl_curve": [r["kl_mean"] for r in rows], "wall_s": time.perf_counter() - t0})
                print(f"    reward {_env.mean(curve[:10]):.3f} -> {_env.mean(curve[-10:]):.3f}", flush=True)
    summary = []
    for task in args.tasks.split(","):
        for setting in settings:
            lasts = [_env.mean(r["reward_curve"][-10:]) for r in runs
                     if r["task"] == task and r["setting"] == setting and r["reward_curve"]]
            summary.append({"task": task, "setting": setting, "seeds": len(lasts), "last10 mean": _env.mean(lasts),
                            "min": min(lasts, default=float("nan")), "max": max(lasts, default=float("nan"))})
    _env.print_table(summary, title="\nreward, mean of the last 10 iterations (over seeds)")
    figure = plot_curves(runs, str(_env.RESULTS_DIR / f"{args.name}.png"))
    key = {f"{s['task']}_{s['setting']}_last10": round(s["last10 mean"], 4) for s in summary}
    _env.save_results(args.name, {"args": vars(args), "tasks": TASKS, "settings": SETTINGS, "summary": summary,
                                  "runs": runs, "figure": figure.replace(str(_env.ROOT) + "/", "")}, key)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--part", choices=("throughput", "curves"), default="throughput")
    ap.add_argument("--tasks", default=None, help="throughput: latency,cpu; curves: digits,words")
    ap.add_argument("--staleness", default="0,1,2,4", help="throughput: comma list of rollout.max_staleness")
    ap.add_argument("--partial", default="0", help="throughput: comma list of rollout.partial_rollout_tokens, each "
                                                   "run at every staleness >= 1 (0: whole responses)")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="curves: comma list of " + ", ".join(SETTINGS))
    ap.add_argument("--seeds", default="0,1,2", help="curves")
    ap.add_argument("--iters", type=int, default=None, help="iterations per run (throughput 30, curves 60)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeline-iters", type=int, default=3)
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--name", default=None, help="results name (default: pipeline / pipeline_curves)")
    args = ap.parse_args(argv)
    curves = args.part == "curves"
    args.tasks = args.tasks or ("digits,words" if curves else "latency,cpu")
    args.iters = args.iters or (60 if curves else 30)
    args.name = args.name or ("pipeline_curves" if curves else "pipeline")
    model = _env.tiny_model()
    _env.set_threads(1)
    _env.wait_for_quiet(args.quiet_wait)
    (run_curves if curves else run_throughput)(args, model)


if __name__ == "__main__":
    main()
