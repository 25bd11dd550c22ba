"""The advantage estimators side by side: reward and KL curves on two tasks, same budget.

What it runs, in one invocation: for each task (reward function) and each estimator
(``ppo.estimator`` gae, grpo, rloo, reinforce_pp, reinforce_pp_baseline), one full run through
``rlhf_ray.coordinator.run.run(cfg, run_dir)`` (what ``python -m rlhf_ray.launch`` calls) on one
private local Ray cluster: configs/demo_cpu.yaml's roles (one vLLM engine, reference, reward
function, two DeepSpeed ZeRO-2 learner ranks, gloo weight sync) on the demo's tiny random-init
Llama (~200k parameters), with everything but the estimator held equal:

  * seed 0; 8 prompts x 4 samples = 32 samples per iteration, up to 16 new tokens, temperature 1
    (every estimator sees the same prompts; the group estimators need >= 2 samples per prompt);
  * k1 KL penalty in the reward (``ppo.kl_in reward``) with a FIXED coefficient 0.05 (no
    adaptive controller), token-mean loss, token ratio, no off-policy correction, no dynamic
    sampling, no overlong penalty;
  * AdamW lr 5e-4, 1 epoch x 2 mini-batches per iteration, gradient clip 1.0 (demo);
  * grpo with ``ppo.group_std_norm`` true (the original GRPO, not Dr. GRPO); gae with the
    demo's shared-body value head (vf_coef 0.1, value clip 0.2, whitened advantages).

Tasks: ``digits`` (the demo: ``rlhf_ray.rewards:digit_fraction``, fraction of non-space
characters that are digits) and ``words4`` (``rlhf_ray.rewards:word_count_target``, target 4:
-|words - 4| / 4, 0 at best). Both on the builtin "digits" prompts (the only builtin set).

Reported per run: the reward (mean raw score, before KL) and KL (mean per-sequence k1 sum)
curves from the run's metrics.jsonl; the first and final reward (means of the first and last 10
iterations), the final KL (mean of the last 10), the median seconds per iteration, the run's wall
time with start-up. "learned" is a plain test, not tuned per estimator: yes when the last-10
mean exceeds the first-10 mean by more than 3 standard errors of that difference. One seed per
run: the curves are single runs, not means, so small differences between estimators are noise.
Written: benchmarks/results/estimators.json (curves, settings, environment) and
benchmarks/results/estimators.png (rows = tasks, columns = reward and KL, one line per
estimator), and a line in benchmarks/results/history.jsonl.

What it leaves out: the other ``ppo`` options (loss_agg, kl_in loss, ratio sequence, rollout
correction, dynamic sampling, overlong buffer) stay at their defaults; no held-out evaluation
(``eval.every 0``), no checkpoints. The vLLM engine runs eagerly (``rollout.vllm.enforce_eager
true``, unlike the demo): each of the 10 runs would otherwise spend ~10-15 s compiling, more
than the compiled decode saves over 100 short iterations (``--compiled`` turns it back on). Start-up
(~40 s per run here: engine, reference, reward and two DeepSpeed ranks) is ~half of each run. The
s/it figures are this shared VM's at the time; compare them within one invocation only.

Run (repository root; 14.5 minutes on 2 cores at load average 6-12, ~85 s per run):
    .venv/bin/python -m benchmarks.estimators
    .venv/bin/python -m benchmarks.estimators --iterations 20 --tasks digits --estimators gae,grpo --name est_smoke
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
import traceback
from typing import Any

from benchmarks import _env
from rlhf_ray.algorithms import ESTIMATORS as TABLE

TASKS = {"digits": "rlhf_ray.rewards:digit_fraction", "words4": "rlhf_ray.rewards:word_count_target"}
ESTIMATORS = tuple(TABLE)  # every ppo.estimator: gae, grpo, rloo, reinforce_pp, reinforce_pp_baseline
SHARED = {
    "seed": 0, "rollout.prompts_per_iteration": 8, "rollout.samples_per_prompt": 4, "rollout.max_new_tokens": 16,
    "rollout.temperature": 1.0, "ppo.kl_coef": 0.05, "ppo.kl_target": "none", "ppo.kl_estimator": "k1",
    "ppo.kl_in": "reward", "ppo.group_std_norm": True, "ppo.loss_agg": "token_mean", "ppo.ratio": "token",
    "ppo.rollout_correction": "none", "ppo.dynamic_sampling": False, "ppo.overlong_buffer": 0,
    "ppo.epochs": 1, "ppo.mini_batches": 2, "learner.lr": 5e-4, "learner.num_ranks": 2,
    "learner.zero_stage": 2, "learner.micro_batch_size": 8, "checkpoint.save_on_stop": False,
    "logging.log_every": 20, "logging.print_samples": 1,
}
HEAD = 10  # iterations averaged for "first" and "final"


# --------------------------------------------------------------------------- one run


def run_config(model: str, task: str, estimator: str, args) -> Any:
    return _env.bench_config(model, **{
        **SHARED, "name": f"est-{task}-{estimator}", "reward.function": TASKS[task],
        "ppo.estimator": estimator, "ppo.iterations": args.iterations,
        "rollout.vllm.enforce_eager": not args.compiled,
    })


def wait_for_names_released(timeout_s: float = 60.0) -> None:
    """Roles name their actors ("rollout-0", ...) and placement groups ("rlhf-rollout", ...) by
    role: the previous run's names must be free before the next run starts its roles (a kill and
    a removal release them asynchronously)."""
    import ray

    def taken() -> bool:
        groups = ray.util.placement_group_table().values()
        return bool(ray.util.list_named_actors()) or any(
            g.get("name", "").startswith("rlhf-") and g.get("state") != "REMOVED" for g in groups)

    t0 = time.time()
    while taken() and time.time() - t0 < timeout_s:
        time.sleep(0.5)


def run_one(model: str, task: str, estimator: str, args) -> dict[str, Any]:
    """One full run via run(cfg, run_dir); its curves from metrics.jsonl."""
    from rlhf_ray.coordinator.run import run

    cfg = run_config(model, task, estimator, args)
    run_dir = tempfile.mkdtemp(prefix=f"est-{task}-{estimator}-", dir=args.run_root)
    wait_for_names_released()
    before, t0 = _env.cpu_times(), time.perf_counter()
    out: dict[str, Any] = {"task": task, "estimator": estimator, "run_dir": run_dir}
    try:
        summary = run(cfg, run_dir)
        out["completed"] = bool(summary.get("completed"))
    except Exception as exc:  # keep the other runs; the table and the JSON say what failed
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        print(f"!!! {task} / {estimator} failed:\n{out['error']}", flush=True)
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_steal_share"] = _env.steal_share(before, _env.cpu_times())
    out["loadavg_after"] = _env.loadavg()
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    out["iterations_done"] = len(rows)
    out["reward_curve"] = [r.get("reward_mean", float("nan")) for r in rows]
    out["kl_curve"] = [r.get("kl_mean", float("nan")) for r in rows]
    out["response_length_curve"] = [r.get("response_length", float("nan")) for r in rows]
    out["iteration_seconds"] = [r.get("time/iteration", float("nan")) for r in rows]
    out.update(summarize(out))
    return out


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """First/final reward, final KL, median s/it, and whether the reward rose beyond noise."""
    rew, kl = r["reward_curve"], r["kl_curve"]
    first, last = rew[:HEAD], rew[-HEAD:]
    out = {"reward_first": _env.mean(first), "reward_final": _env.mean(last), "kl_final": _env.mean(kl[-HEAD:]),
           "s_per_it_median": _env.median(r["iteration_seconds"][1:])}  # the first iteration syncs weights cold
    if len(rew) >= 2 * HEAD:
        delta = out["reward_final"] - out["reward_first"]
        se = math.sqrt(_env.stdev(first) ** 2 / len(first) + _env.stdev(last) ** 2 / len(last))
        out.update(reward_delta=delta, reward_delta_se=se, learned="yes" if delta > 3 * se else "no")
    else:
        out.update(reward_delta=float("nan"), reward_delta_se=float("nan"), learned="n/a (too few iterations)")
    if "error" in r:
        out["learned"] = "ERROR"
    return out


# --------------------------------------------------------------------------- figure


def plot(runs: list[dict], tasks: list[str], estimators: list[str], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 3.4 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        for j, (key, label) in enumerate((("reward_curve", "reward (mean score)"),
                                          ("kl_curve", "KL to reference (k1, per sequence)"))):
            ax = axes[i][j]
            for est in estimators:
                r = next((x for x in runs if x["task"] == task and x["estimator"] == est), None)
                if r and r[key]:
                    ax.plot(range(1, len(r[key]) + 1), r[key], label=est, linewidth=1.2)
            ax.set_title(f"{task} ({TASKS[task].split(':')[1]}): {label}", fontsize=10)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("ppo.estimator on the tiny Llama: 8 prompts x 4 samples x 16 tokens, kl_coef 0.05 (k1 in reward), "
                 "lr 5e-4, seed 0", fontsize=10)
    return _env.save_figure(fig, path)


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=100, help="PPO iterations per run")
    ap.add_argument("--tasks", default=",".join(TASKS), help=f"comma list of {', '.join(TASKS)}")
    ap.add_argument("--estimators", default=",".join(ESTIMATORS), help="comma list of ppo.estimator values")
    ap.add_argument("--compiled", action="store_true", help="compile the engine's model (the demo's setting)")
    ap.add_argument("--run-root", default=None, help="where the runs' directories go (default: a temp dir)")
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--name", default="estimators")
    args = ap.parse_args()
    tasks, estimators = args.tasks.split(","), args.estimators.split(",")
    for t in tasks:
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for e in estimators:
        if e not in ESTIMATORS:
            ap.error(f"unknown estimator {e!r}; choose from {', '.join(ESTIMATORS)}")
    args.run_root = args.run_root or tempfile.mkdtemp(prefix="bench-estimators-")

    t_start = time.perf_counter()
    threads = _env.set_threads(1)
    quiet = _env.wait_for_quiet(args.quiet_wait)
    model = _env.tiny_model()
    _env.start_ray(num_cpus=4)  # run() attaches to it: one private cluster for every run
    runs = []
    for task in tasks:
        for est in estimators:
            print(f"\n=== task {task}, estimator {est}: {args.iterations} iterations", flush=True)
            runs.append(run_one(model, task, est, args))
            r = runs[-1]
            print(f"=== {task} / {est}: reward {r['reward_first']:.3f} -> {r['reward_final']:.3f}, KL "
                  f"{r['kl_final']:.3f}, {r['s_per_it_median']:.2f} s/it, {r['wall_s']:.0f} s with start-up",
                  flush=True)
    import ray

    ray.shutdown()
    total_s = time.perf_counter() - t_start

    rows = [{"task": r["task"], "estimator": r["estimator"], "iters": r["iterations_done"],
             f"reward first{HEAD}": r["reward_first"], f"reward last{HEAD}": r["reward_final"],
             "delta": r["reward_delta"], "3 x se": 3 * r["reward_delta_se"], "learned": r["learned"],
             f"KL last{HEAD}": r["kl_final"], "s/it (median)": r["s_per_it_median"], "run wall s": r["wall_s"],
             "CPU steal": r["cpu_steal_share"]} for r in runs]
    _env.print_table(rows, title=f"\n{args.iterations} iterations of 8 prompts x 4 samples x <= 16 tokens per run; "
                                 f"total {total_s / 60:.1f} min")
    failed = [r for r in runs if "error" in r]
    for r in failed:
        print(f"\n{r['task']} / {r['estimator']} raised:\n{r['error']}")
    png = plot(runs, tasks, estimators, str(_env.RESULTS_DIR / f"{args.name}.png"))
    print(f"figure: {os.path.relpath(png, _env.ROOT)}")
    key = {f"{r['task']}/{r['estimator']}": {"reward_first": round(r["reward_first"], 4),
                                             "reward_final": round(r["reward_final"], 4),
                                             "kl_final": round(r["kl_final"], 4),
                                             "s_per_it": round(r["s_per_it_median"], 3), "learned": r["learned"]}
           for r in runs}
    key["total_minutes"] = round(total_s / 60, 1)
    _env.save_results(args.name, {
        "args": vars(args), "settings": {**SHARED, "rollout.vllm.enforce_eager": not args.compiled,
                                         "tasks": {t: TASKS[t] for t in tasks}},
        "threads": threads, "load": {**quiet, "end": _env.loadavg()}, "total_seconds": total_s,
        "figure": os.path.relpath(png, _env.ROOT), "table": rows, "runs": runs}, key)


if __name__ == "__main__":
    main()
