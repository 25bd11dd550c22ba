"""Async generation with and without the off-policy correction: reward curves side by side.

With ``rollout.async_generation true`` the engines generate the next batch while the learners
train on this one, so every batch comes from the weights before the last update: one step
off-policy. The PPO ratio's denominator (the learner's old logprobs, on the current weights) is
then not the policy that sampled the tokens. ``ppo.rollout_correction`` weights each token's
policy loss by w = exp(old - engine logprob); ``auto`` (the default) turns ``tis`` on with async
generation. This benchmark runs the one-stage demo both ways and saves both curves.

What it runs, in one invocation: configs/demo_cpu.yaml (one vLLM engine, reference, reward
function ``digit_fraction``, two DeepSpeed ZeRO-2 learner ranks, gloo weight sync, the demo's
tiny random-init Llama, its ``ppo.iterations`` unless ``--iterations`` is given) with
``rollout.async_generation true``, once per ``ppo.rollout_correction`` in ``--corrections``
(default: none, then tis), each through ``rlhf_ray.coordinator.run.run(cfg, run_dir)`` (what
``python -m rlhf_ray.launch`` calls) on one private local Ray cluster. Everything else is held
equal: seed 0, the same prompts, no held-out evaluation (``eval.every 0``), no checkpoint at the
end. ``--also-on-policy`` adds a run without async generation (the on-policy reference).

Reported per run: the reward curve (mean raw score, before KL), the KL curve (per-sequence k1),
the engine-vs-learner logprob mismatch (every iteration with a correction, every
``sync.check_logprobs_every`` without), the correction's mean and max raw weight, the fraction
of tokens it truncated (correction runs), s/it, and first/final reward (means of the first and
last 10 iterations). One seed per run: the curves are single runs, not means; small differences
are noise.
Written: benchmarks/results/<name>.json (default ``async_correction``: curves, settings,
environment snapshot) and a line in benchmarks/results/history.jsonl.

What it leaves out: icepop (add it: ``--corrections none,tis,icepop``), other seeds, GPU engines
(bf16 engines add a numerical gap on top of the policy lag).

Run (repository root; each run is one demo, ~3-4 minutes on 2 cores with start-up):
    .venv/bin/python -m benchmarks.async_correction
    .venv/bin/python -m benchmarks.async_correction --iterations 5 --name async_correction_smoke
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import traceback
from typing import Any

from benchmarks import _env
from benchmarks.estimators import read_metrics, wait_for_names_released
from rlhf_ray.algorithms import CORRECTION_MODES as CORRECTIONS
HEAD = 10  # iterations averaged for "first" and "final"


def run_config(model: str, correction: str, asynchronous: bool, args) -> Any:
    overrides: dict[str, Any] = {
        "name": f"async-{correction}" if asynchronous else "on-policy", "seed": 0,
        "rollout.async_generation": asynchronous, "ppo.rollout_correction": correction,
        "checkpoint.save_on_stop": False, "checkpoint.every": 0, "logging.log_every": 20,
    }
    if args.iterations:
        overrides["ppo.iterations"] = args.iterations
    if args.eager:
        overrides["rollout.vllm.enforce_eager"] = True
    return _env.bench_config(model, **overrides)


def _curve(rows: list[dict], key: str) -> list[float]:
    return [r.get(key, float("nan")) for r in rows]


def run_one(model: str, correction: str, asynchronous: bool, args) -> dict[str, Any]:
    """One full run via run(cfg, run_dir); its curves from metrics.jsonl."""
    from rlhf_ray.coordinator.run import run

    cfg = run_config(model, correction, asynchronous, args)
    label = cfg.name
    run_dir = tempfile.mkdtemp(prefix=f"{label}-", dir=args.run_root)
    wait_for_names_released()
    before, t0 = _env.cpu_times(), time.perf_counter()
    out: dict[str, Any] = {"label": label, "async_generation": asynchronous,
                           "rollout_correction": cfg.ppo.rollout_correction, "run_dir": run_dir}
    try:
        summary = run(cfg, run_dir)
        out["completed"] = bool(summary.get("completed"))
    except Exception as exc:  # keep the other runs; the table and the JSON say what failed
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        print(f"!!! {label} failed:\n{out['error']}", flush=True)
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_steal_share"] = _env.steal_share(before, _env.cpu_times())
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    out["iterations_done"] = len(rows)
    out["reward_curve"] = _curve(rows, "reward_mean")
    out["kl_curve"] = _curve(rows, "kl_mean")
    out["logprob_mismatch_curve"] = _curve(rows, "logprob_mismatch_mean")  # NaN where not checked
    out["correction_weight_mean_curve"] = _curve(rows, "correction/weight_mean")
    out["correction_weight_max_curve"] = _curve(rows, "correction/weight_max")
    out["correction_fraction_curve"] = _curve(rows, "correction/fraction")
    out["iteration_seconds"] = _curve(rows, "time/iteration")
    rew = out["reward_curve"]
    out["reward_first"] = _env.mean(rew[:HEAD])
    out["reward_final"] = _env.mean(rew[-HEAD:])
    out["kl_final"] = _env.mean(out["kl_curve"][-HEAD:])
    out["s_per_it_median"] = _env.median(out["iteration_seconds"][1:])  # the first syncs cold
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=0, help="PPO iterations per run (0: the demo config's)")
    ap.add_argument("--corrections", default="none,tis", help=f"comma list of {', '.join(CORRECTIONS)}")
    ap.add_argument("--also-on-policy", action="store_true", help="add a run without async generation")
    ap.add_argument("--eager", action="store_true", help="run the engine's model eagerly (the demo compiles it)")
    ap.add_argument("--run-root", default=None, help="where the runs' directories go (default: a temp dir)")
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--name", default="async_correction")
    args = ap.parse_args()
    corrections = args.corrections.split(",")
    for c in corrections:
        if c not in CORRECTIONS:
            ap.error(f"unknown correction {c!r}; choose from {', '.join(CORRECTIONS)}")
    args.run_root = args.run_root or tempfile.mkdtemp(prefix="bench-async-correction-")

    t_start = time.perf_counter()
    threads = _env.set_threads(1)
    quiet = _env.wait_for_quiet(args.quiet_wait)
    model = _env.tiny_model()
    _env.start_ray(num_cpus=4)  # run() attaches to it: one private cluster for every run
    plan = [(c, True) for c in corrections] + ([("none", False)] if args.also_on_policy else [])
    runs = []
    for correction, asynchronous in plan:
        print(f"\n=== async_generation {asynchronous}, rollout_correction {correction}", flush=True)
        runs.append(run_one(model, correction, asynchronous, args))
        r = runs[-1]
        print(f"=== {r['label']}: reward {r['reward_first']:.3f} -> {r['reward_final']:.3f}, KL {r['kl_final']:.3f}, "
              f"{r['s_per_it_median']:.2f} s/it, {r['wall_s']:.0f} s with start-up", flush=True)
    import ray

    ray.shutdown()
    total_s = time.perf_counter() - t_start

    rows = [{"run": r["label"], "iters": r["iterations_done"], f"reward first{HEAD}": r["reward_first"],
             f"reward last{HEAD}": r["reward_final"], f"KL last{HEAD}": r["kl_final"],
             "mismatch (mean)": _env.mean([x for x in r["logprob_mismatch_curve"] if x == x]),
             "s/it (median)": r["s_per_it_median"], "run wall s": r["wall_s"]} for r in runs]
    _env.print_table(rows, title=f"\nthe one-stage demo, async generation, by rollout correction; "
                                 f"total {total_s / 60:.1f} min")
    for r in runs:
        if "error" in r:
            print(f"\n{r['label']} raised:\n{r['error']}")
    key = {r["label"]: {"reward_first": round(r["reward_first"], 4), "reward_final": round(r["reward_final"], 4),
                        "kl_final": round(r["kl_final"], 4), "s_per_it": round(r["s_per_it_median"], 3),
                        "completed": r.get("completed", False)} for r in runs}
    key["total_minutes"] = round(total_s / 60, 1)
    _env.save_results(args.name, {
        "args": vars(args), "config": str(_env.DEMO_CONFIG.relative_to(_env.ROOT)),
        "threads": threads, "load": {**quiet, "end": _env.loadavg()}, "total_seconds": total_s,
        "table": rows, "runs": runs}, key)


if __name__ == "__main__":
    main()
