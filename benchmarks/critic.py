"""When is the shared body the better critic? The main job's PPO stage in ten critic settings, 3 seeds each.

What it runs, in one invocation: for each task, each setting and each seed (seed-major: every
setting for seed 0, then seed 1, ..., so a run cut short stays balanced), one full run through
``rlhf_ray.coordinator.run.run(cfg, run_dir)`` on one private local Ray cluster. Settings:

  * ``shared``: the value head on the policy's own body, value gradient into the body (the default);
  * ``shared_head_only``: the same head, ``model.value_grad_to_body false`` (the value loss trains the head);
  * ``separate``: ``model.separate_critic``, a second body started from the SFT model;
  * ``separate_rm``: that critic started from the reward model (``model.value_init reward_model``:
    its body, its score head as the value head; compare task only, the words task has no RM);
  * each of those four again with a critic warm-up (``ppo.critic_warmup_iterations``, default 10:
    the first 10 iterations train only the critic; they count in ``ppo.iterations``, so the
    sample budget stays equal and the policy gets 10 fewer updates);
  * ``grpo`` and ``rloo`` (``ppo.estimator``): critic-free, the same 4 samples per prompt.

Tasks:

  * ``compare`` (the main job, configs/pipeline_cpu.yaml's ``ppo:`` section as
    ``PipelineConfig`` builds it): the SFT model and RM from /work/main/artifacts/pipeline (paths
    by ``--artifacts``), 16 prompts x 4 samples, <= 6 new tokens, kl_coef 0.2 (k1, in the reward,
    fixed), 2 epochs x 2 mini-batches, lr 5e-4, vf_coef 0.1, value clip 0.2, RM scores
    normalised. Held-out gold accuracy (``rlhf_ray.rewards:larger_number_correct`` on the 400
    held-out prompts, temperature 1) at iterations 0, 25, ..., the last: ``eval/gold_mean``.
  * ``words`` (configs/demo_cpu.yaml style, one stage): the demo's random-init tiny Llama, reward
    function ``rlhf_ray.rewards:word_count_target`` (-|words - 4| / 4), 8 prompts x 4 samples,
    16 new tokens, the demo's adaptive KL; held-out reward on 32 held-out prompts, temperature 1.

Reported per run and per setting (mean, std, min, max over seeds): held-out gold (or reward)
before -> after; the final KL (mean k1 per sequence over the last 10 iterations); the median
seconds per policy iteration (warm-up iterations and the first iteration left out); the
learners' peak resident memory (VmHWM of both learner processes, read from /proc every second
while the run lasts: the largest rank, MiB); the parameters trained (what the optimiser holds)
and the part the value loss reaches, counted from the checkpoints' tensors; the value
diagnostics (explained variance, value/return correlation, value-loss clip fraction, value
loss, mean value vs mean return at the first response token), means of the first and the
last 10 iterations. Written after every run: benchmarks/results/<name>.json; at the end also
benchmarks/results/<name>.png (per task: held-out gold vs iteration, one line per setting, the
band spans the seeds' min..max; and the training batches' gold, 10-iteration moving mean) and a
line in benchmarks/results/history.jsonl.

What it leaves out: no checkpoints (``checkpoint.every 0``, no save on stop; the main job saves
every 50 iterations), no TensorBoard. ``--iterations`` below the main job's 150 shortens every
setting alike (``--deadline`` picks it from the first run's time: the JSON says which was used).
The s/it figures are this shared 2-core VM's at the time: compare them within one invocation only.

Measured (benchmarks/results/critic.json, 2026-12-07): the compare task only, 100 iterations per run
for every setting, not the main job's 150 (``--deadline``: the 150-iteration first run took 87 s
and 30 of them would not have ended in time; that run, which reproduced the main job's held-out
evaluations exactly, is kept in the JSON as "probe"); 30 runs in 36 minutes. The words task
(benchmarks/results/critic_words.json, 2026-12-07 at b306d6b): 50 iterations per run (``--deadline``;
the 150-iteration probe took 68 s), 24 runs in 22 minutes.

Run (repository root; ~75-100 s per run on 2 cores, 30 runs per task):
    .venv/bin/python -m benchmarks.critic --deadline 23:05
    .venv/bin/python -m benchmarks.critic --tasks words --name critic_words
    .venv/bin/python -m benchmarks.critic --iterations 20 --seeds 0 --settings shared,grpo --name critic_smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import threading
import time
import traceback
from typing import Any

from benchmarks import _env
from benchmarks.estimators import read_metrics, wait_for_names_released

WARMUP = 10  # critic warm-up iterations of the *_warmup settings
HEAD = 10  # iterations averaged for "first" and "last"
CRITICS = {"shared": {}, "shared_head_only": {"model.value_grad_to_body": False},
           "separate": {"model.separate_critic": True},
           "separate_rm": {"model.separate_critic": True, "model.value_init": "reward_model"}}
SETTINGS = {**CRITICS, **{f"{k}_warmup": {**v, "ppo.critic_warmup_iterations": WARMUP} for k, v in CRITICS.items()},
            "grpo": {"ppo.estimator": "grpo"}, "rloo": {"ppo.estimator": "rloo"}}
NEEDS_RM = ("separate_rm", "separate_rm_warmup")
TASKS = ("compare", "words")
MAIN_ITERATIONS = {"compare": 150, "words": 150}
PIPELINE_YAML = _env.ROOT / "configs" / "pipeline_cpu.yaml"
COMMON = {"logging.tensorboard": False, "logging.progress_bar": False, "checkpoint.every": 0,
          "checkpoint.save_on_stop": False}
WORDS = {"reward.function": "rlhf_ray.rewards:word_count_target", "rollout.samples_per_prompt": 4,
         "rollout.prompts_per_iteration": 8, "rollout.vllm.enforce_eager": True, "eval.every": 25,
         "eval.holdout": 32, "eval.temperature": 1.0, "logging.log_every": 25,
         "learner.micro_batch_size": 8}
DIAGNOSTICS = ("explained_variance", "value_return_corr", "value_clip_fraction", "value_loss",
               "value_first_token_mean", "return_first_token_mean", "value_head_grad_norm")


# --------------------------------------------------------------------------- configs


def compare_config(art: str, setting: str, seed: int, iterations: int):
    """The main job's PPO section (PipelineConfig, validated as the pipeline does) with the
    SFT/RM/data paths made absolute and the setting's overrides."""
    from rlhf_ray.config import load_config
    from rlhf_ray.supervised.config import PipelineConfig, validate_pipeline

    sft, rm, data = (os.path.join(art, x) for x in ("sft", "rm", "data"))
    over = {"sft.train.output_dir": sft, "rm.train.output_dir": rm, "ppo.model.path": sft,
            "ppo.reward.model_path": rm, "ppo.data.prompts": os.path.join(data, "prompts.jsonl"),
            "ppo.eval.prompts": os.path.join(data, "eval_prompts.jsonl"), "demo_data_dir": "null",
            "ppo.seed": seed, "ppo.ppo.iterations": iterations, "ppo.name": f"critic-compare-{setting}-s{seed}",
            **{f"ppo.{k}": v for k, v in {**COMMON, **SETTINGS[setting]}.items()}}
    cfg = load_config(str(PIPELINE_YAML), {k: _raw(v) for k, v in over.items()}, cls=PipelineConfig,
                      validator=validate_pipeline)
    return cfg.ppo


def words_config(model: str, setting: str, seed: int, iterations: int):
    return _env.bench_config(model, **{**COMMON, **WORDS, **SETTINGS[setting], "seed": seed,
                                       "ppo.iterations": iterations, "name": f"critic-words-{setting}-s{seed}"})


def _raw(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def applies(task: str, setting: str) -> bool:
    return task == "compare" or setting not in NEEDS_RM


# --------------------------------------------------------------------------- parameters and memory


def tensor_counts(path: str) -> dict[str, int]:
    """{tensor name: element count} of a checkpoint's model.safetensors (header only)."""
    from safetensors import safe_open

    out = {}
    with safe_open(os.path.join(path, "model.safetensors"), "pt") as fh:
        for name in fh.keys():
            n = 1
            for d in fh.get_slice(name).get_shape():
                n *= d
            out[name] = n
    return out


def parameters(cfg) -> dict[str, Any]:
    """What the optimiser trains and what the value loss reaches, counted from the checkpoints:
    the policy (every tensor of model.path), the value head (hidden + 1), a separate critic's body
    (the policy's or the RM's tensors without the LM / score head)."""
    m, p = cfg.model, cfg.ppo
    policy = tensor_counts(m.path)
    body = sum(n for k, n in policy.items() if not k.startswith("lm_head"))
    hidden = json.load(open(os.path.join(m.path, "config.json")))["hidden_size"]
    head = hidden + 1
    if not p.uses_critic:
        return {"policy": sum(policy.values()), "value_head": 0, "critic_body": 0,
                "trained": sum(policy.values()), "value_loss_reaches": 0}
    if m.separate_critic:
        src = cfg.reward.model_path if m.value_init == "reward_model" else (m.critic_path or m.path)
        critic = sum(n for k, n in tensor_counts(src).items() if not k.startswith(("lm_head", "score")))
        reach = critic + head if m.value_grad_to_body else head
        return {"policy": sum(policy.values()), "value_head": head, "critic_body": critic,
                "trained": sum(policy.values()) + reach, "value_loss_reaches": reach}
    reach = body + head if m.value_grad_to_body else head
    return {"policy": sum(policy.values()), "value_head": head, "critic_body": 0,
            "trained": sum(policy.values()) + head, "value_loss_reaches": reach}


class LearnerMemory:
    """Peak resident memory of the learner ranks: polls <run_dir>/placement.json for their pids,
    then /proc/<pid>/status VmHWM (the kernel's high-water mark) every ``period`` seconds until
    stopped; the last reading before a process exits is its peak up to that second."""

    def __init__(self, run_dir: str, period: float = 1.0):
        self.run_dir, self.period, self.peak_kib = run_dir, period, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _pids(self) -> list[int]:
        try:
            with open(os.path.join(self.run_dir, "placement.json")) as fh:
                return [int(v["pid"]) for v in json.load(fh).values() if v.get("role") == "learner"]
        except (OSError, ValueError, KeyError):
            return []

    def _watch(self) -> None:
        pids: list[int] = []
        while not self._stop.wait(self.period):
            pids = pids or self._pids()
            for pid in pids:
                try:
                    with open(f"/proc/{pid}/status") as fh:
                        hwm = next((int(line.split()[1]) for line in fh if line.startswith("VmHWM:")), 0)
                except (OSError, ValueError):
                    continue
                self.peak_kib[pid] = max(self.peak_kib.get(pid, 0), hwm)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(timeout=5)
        ranks = [round(v / 1024, 1) for v in self.peak_kib.values()]
        return {"learner_peak_rss_mib": max(ranks) if ranks else None, "learner_peak_rss_mib_ranks": ranks}


# --------------------------------------------------------------------------- one run


def run_one(task: str, setting: str, seed: int, iterations: int, args) -> dict[str, Any]:
    """One full run via run(cfg, run_dir); its curves and summary figures."""
    from rlhf_ray.coordinator.run import run

    cfg = (compare_config(args.artifacts, setting, seed, iterations) if task == "compare"
           else words_config(args.words_model, setting, seed, iterations))
    run_dir = tempfile.mkdtemp(prefix=f"critic-{task}-{setting}-s{seed}-", dir=args.run_root)
    out: dict[str, Any] = {"task": task, "setting": setting, "seed": seed, "iterations": iterations,
                           "run_dir": run_dir, "overrides": SETTINGS[setting], "parameters": parameters(cfg)}
    wait_for_names_released()
    before, t0 = _env.cpu_times(), time.perf_counter()
    memory = LearnerMemory(run_dir)
    try:
        out["completed"] = bool(run(cfg, run_dir).get("completed"))
    except Exception as exc:  # keep the other runs; the JSON says what failed
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        print(f"!!! {task} / {setting} / seed {seed} failed:\n{out['error']}", flush=True)
    out.update(memory.stop())
    out["wall_s"] = time.perf_counter() - t0
    out["cpu_steal_share"] = _env.steal_share(before, _env.cpu_times())
    out["loadavg_after"] = _env.loadavg()
    out.update(curves(run_dir, cfg))
    out.update(summarize(out))
    return out


def curves(run_dir: str, cfg) -> dict[str, Any]:
    rows = read_metrics(os.path.join(run_dir, "metrics.jsonl"))
    evals = read_metrics(os.path.join(run_dir, "eval.jsonl"))
    warm = cfg.ppo.critic_warmup_iterations if cfg.ppo.uses_critic else 0
    col = lambda key, rs=rows: [r.get(key, float("nan")) for r in rs]  # noqa: E731
    return {"iterations_done": len(rows), "warmup_iterations": warm, "reward_curve": col("reward_mean"),
            "kl_curve": col("kl_mean"), "gold_curve": col("gold_mean"),
            "iteration_seconds": col("time/iteration"),
            "diagnostic_curves": {k: col(k) for k in DIAGNOSTICS if any(k in r for r in rows)},
            "eval_iterations": [int(e["iteration"]) for e in evals], "eval_gold": col("eval/gold_mean", evals),
            "eval_reward": col("eval/reward_mean", evals)}


def nanmean(xs: list[float]) -> float:
    return _env.mean([x for x in xs if x == x])


def summarize(r: dict[str, Any]) -> dict[str, Any]:
    """Before/after held-out gold and reward, final KL, median s/it of the policy iterations,
    first/last-10 value diagnostics."""
    warm = r["warmup_iterations"]
    policy_its = r["iteration_seconds"][warm + 1:]  # warm-ups sync nothing; the first policy iteration syncs cold
    out = {"kl_final": nanmean(r["kl_curve"][-HEAD:]), "s_per_it_median": _env.median(policy_its),
           "reward_first": nanmean(r["reward_curve"][:HEAD]), "reward_final": nanmean(r["reward_curve"][-HEAD:]),
           "gold_train_final": nanmean(r["gold_curve"][-HEAD:])}
    for key in ("eval_gold", "eval_reward"):
        xs = [x for x in r[key] if x == x]
        out[f"{key}_before"], out[f"{key}_after"] = (xs[0], xs[-1]) if xs else (float("nan"), float("nan"))
    for k, xs in r["diagnostic_curves"].items():  # the first 10, the first 10 policy iterations, the last 10
        out[f"{k}_first"], out[f"{k}_last"] = nanmean(xs[:HEAD]), nanmean(xs[-HEAD:])
        out[f"{k}_policy_start"] = nanmean(xs[warm:warm + HEAD])
    if "error" in r:
        out["learned"] = "ERROR"
    return out


# --------------------------------------------------------------------------- over seeds


SUMMED_UP = ("eval_gold_before", "eval_gold_after", "eval_reward_before", "eval_reward_after", "gold_train_final",
             "reward_final", "kl_final", "s_per_it_median", "learner_peak_rss_mib", "wall_s",
             *(f"{k}_{w}" for k in DIAGNOSTICS for w in ("first", "policy_start", "last")))


def spread(xs: list[float]) -> dict[str, Any]:
    xs = [x for x in xs if x is not None and x == x]
    if not xs:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": _env.mean(xs), "std": _env.stdev(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def per_setting(runs: list[dict], task: str, settings: list[str]) -> dict[str, dict]:
    """{setting: {figure: {mean, std, min, max, n}}} over the seeds that completed; n/a settings named."""
    out = {}
    for s in settings:
        if not applies(task, s):
            out[s] = {"n/a": "needs a reward model (the words task scores with a function)"}
            continue
        done = [r for r in runs if r["task"] == task and r["setting"] == s and r.get("completed")]
        if not done:
            continue
        row = {k: spread([r.get(k) for r in done]) for k in SUMMED_UP}
        row["seeds"] = [r["seed"] for r in done]
        row["parameters"] = done[0]["parameters"]
        row["gold_gain"] = spread([r["eval_gold_after"] - r["eval_gold_before"] for r in done])
        out[s] = row
    return out


def table_rows(agg: dict[str, dict], task: str) -> list[dict]:
    def f(row, key, scale=1.0):
        x = row[key]
        if x["mean"] is None:
            return "-"
        return f"{x['mean'] * scale:.3f} [{x['min'] * scale:.3f}, {x['max'] * scale:.3f}]"

    held = "gold" if task == "compare" else "reward"
    rows = []
    for s, row in agg.items():
        if "n/a" in row:
            rows.append({"setting": s, f"held-out {held} before": "n/a"})
            continue
        rows.append({"setting": s, "seeds": len(row["seeds"]),
                     f"held-out {held} before": f(row, f"eval_{held}_before"),
                     f"after (mean [min, max])": f(row, f"eval_{held}_after"),
                     "KL last10": f(row, "kl_final"), "s/it": f(row, "s_per_it_median"),
                     "learner MiB": f"{row['learner_peak_rss_mib']['mean']:.0f}"
                     if row["learner_peak_rss_mib"]["mean"] else "-",
                     "params trained": row["parameters"]["trained"],
                     "EV last10": f(row, "explained_variance_last") if "explained_variance_last" in row else "-",
                     "corr last10": f(row, "value_return_corr_last")})
    return rows


# --------------------------------------------------------------------------- figure


def band(runs: list[dict], xkey: str | None, ykey: str, smooth: int = 1):
    """x, mean, min, max over the runs' curves (cut to the shortest); ``smooth``: trailing mean."""
    ys = [r[ykey] for r in runs if r[ykey]]
    if not ys:
        return None
    n = min(len(y) for y in ys)
    ys = [y[:n] for y in ys]
    if smooth > 1:
        ys = [[nanmean(y[max(0, i - smooth + 1):i + 1]) for i in range(n)] for y in ys]
    xs = runs[0][xkey][:n] if xkey else list(range(n))
    cols = list(zip(*ys))
    return xs, [nanmean(list(c)) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot(runs: list[dict], tasks: list[str], settings: list[str], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = dict(zip(CRITICS, ("tab:blue", "tab:orange", "tab:green", "tab:red")))
    colours.update(grpo="tab:purple", rloo="tab:brown")
    fig, axes = plt.subplots(len(tasks), 2, figsize=(13, 4.2 * len(tasks)), squeeze=False)
    for i, task in enumerate(tasks):
        held = "eval_gold" if task == "compare" else "eval_reward"
        panels = ((held, "eval_iterations", 1, "held-out " + ("gold accuracy" if task == "compare" else "reward")),
                  ("gold_curve" if task == "compare" else "reward_curve", None, 10,
                   "training batches' " + ("gold" if task == "compare" else "reward") + " (10-iteration mean)"))
        for j, (ykey, xkey, smooth, label) in enumerate(panels):
            ax = axes[i][j]
            for s in settings:
                got = band([r for r in runs if r["task"] == task and r["setting"] == s and r.get("completed")],
                           xkey, ykey, smooth)
                if got is None:
                    continue
                xs, mid, lo, hi = got
                c = colours[s.removesuffix("_warmup")]
                style = "--" if s.endswith("_warmup") else "-"
                ax.plot(xs, mid, style, color=c, label=s, linewidth=1.3, marker="o" if xkey else None, markersize=3)
                ax.fill_between(xs, lo, hi, color=c, alpha=0.10)
            ax.set_title(f"{task}: {label}", fontsize=10)
            ax.set_xlabel("iteration")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Critic settings: mean over seeds, band = min..max over seeds (dashed: with critic warm-up)",
                 fontsize=10)
    return _env.save_figure(fig, path)


# --------------------------------------------------------------------------- main


def clock(hhmm: str | None) -> float | None:
    """Today's HH:MM (UTC) as a time.time() value."""
    if not hhmm:
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    h, m = (int(x) for x in hhmm.split(":"))
    return now.replace(hour=h, minute=m, second=0, microsecond=0).timestamp()


def fit_iterations(probe: dict, n_runs: int, until: float, full: int) -> int:
    """Iterations per run so that ``n_runs`` runs like ``probe`` end by ``until``: its start-up
    (wall minus its iterations) plus the rest scaled, with 15% margin (separate critics are
    slower); a multiple of 25 (the evaluation period), at least 50, at most ``full``."""
    per_it = sum(probe["iteration_seconds"]) / max(1, len(probe["iteration_seconds"]))
    fixed = probe["wall_s"] - per_it * probe["iterations_done"]
    budget = (until - time.time()) / n_runs / 1.15
    its = int((budget - fixed) / per_it) // 25 * 25
    return max(50, min(full, its))


def payload(args, runs, tasks, settings, iterations, notes, t_start, probe) -> dict[str, Any]:
    aggs = {t: per_setting(runs, t, settings) for t in tasks}
    return {"args": vars(args), "iterations": iterations, "notes": notes, "settings": SETTINGS,
            "provenance": provenance(args) if "compare" in tasks else None,
            "total_seconds": time.perf_counter() - t_start, "per_setting": aggs,
            "table": {t: table_rows(aggs[t], t) for t in tasks}, "probe": probe, "runs": runs}


def provenance(args) -> dict[str, Any]:
    out = {"pipeline_yaml": str(PIPELINE_YAML), "artifacts": args.artifacts}
    for stage in ("sft", "rm"):
        try:
            with open(os.path.join(args.artifacts, stage, "train_summary.json")) as fh:
                out[stage] = json.load(fh)
            out[f"{stage}_mtime"] = time.ctime(os.path.getmtime(os.path.join(args.artifacts, stage, "model.safetensors")))
        except OSError as exc:
            out[stage] = f"unreadable: {exc}"
    return out


def write_partial(name: str, doc: dict[str, Any]) -> None:
    _env.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (_env.RESULTS_DIR / f"{name}.json").write_text(
        json.dumps({"name": name, "env": _env.snapshot(), "partial": True, **doc}, indent=2, default=float) + "\n")


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="compare", help=f"comma list of {', '.join(TASKS)}")
    ap.add_argument("--settings", default=",".join(SETTINGS), help="comma list of " + ", ".join(SETTINGS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iterations", type=int, default=None, help="per run (default: the main job's 150)")
    ap.add_argument("--deadline", default=None, help="HH:MM UTC: after the first run, lower --iterations for every "
                                                     "run alike so that all of them end by then")
    ap.add_argument("--stop-at", default=None, help="HH:MM UTC: start no run after this")
    ap.add_argument("--artifacts", default="/work/main/artifacts/pipeline", help="the main job's sft/, rm/, data/")
    ap.add_argument("--run-root", default=None, help="where the runs' directories go (default: a temp dir)")
    ap.add_argument("--quiet-wait", type=float, default=30.0)
    ap.add_argument("--name", default="critic")
    args = ap.parse_args()
    for t in args.tasks.split(","):
        if t not in TASKS:
            ap.error(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    for s in args.settings.split(","):
        if s not in SETTINGS:
            ap.error(f"unknown setting {s!r}; choose from {', '.join(SETTINGS)}")
    return args


def main() -> None:
    args = parse_args()
    tasks, settings = args.tasks.split(","), args.settings.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    args.run_root = args.run_root or tempfile.mkdtemp(prefix="bench-critic-")
    t_start = time.perf_counter()
    threads = _env.set_threads(1)
    quiet = _env.wait_for_quiet(args.quiet_wait)
    args.words_model = _env.tiny_model() if "words" in tasks else None
    _env.start_ray(num_cpus=4)  # run() attaches to it: one private cluster for every run
    stop_at, deadline = clock(args.stop_at), clock(args.deadline)
    plan = [(t, s, seed) for t in tasks for seed in seeds for s in settings if applies(t, s)]
    iterations = {t: args.iterations or MAIN_ITERATIONS[t] for t in tasks}
    notes: list[str] = []
    runs: list[dict] = []
    probe = None
    i = 0
    while i < len(plan):
        task, setting, seed = plan[i]
        if stop_at and time.time() > stop_at:
            notes.append(f"stopped at --stop-at {args.stop_at}: {len(plan) - i} run(s) not started")
            print(f"=== {notes[-1]}", flush=True)
            break
        print(f"\n=== [{i + 1}/{len(plan)}] {task} / {setting} / seed {seed}: {iterations[task]} iterations",
              flush=True)
        r = run_one(task, setting, seed, iterations[task], args)
        runs.append(r)
        print(f"=== {task} / {setting} / seed {seed}: held-out {r['eval_gold_before']:.3f} -> "
              f"{r['eval_gold_after']:.3f} (gold), reward {r['eval_reward_before']:.3f} -> "
              f"{r['eval_reward_after']:.3f}, KL {r['kl_final']:.3f}, {r['s_per_it_median']:.2f} s/it, "
              f"{r['wall_s']:.0f} s with start-up, learner peak {r['learner_peak_rss_mib']} MiB", flush=True)
        i += 1
        if deadline and probe is None and r.get("completed"):
            its = fit_iterations(r, len(plan), deadline, iterations[task])
            probe = {k: v for k, v in r.items() if not k.endswith("_curve")}
            if its < iterations[task]:
                notes.append(f"--deadline {args.deadline}: the first run ({iterations[task]} iterations) took "
                             f"{r['wall_s']:.0f} s; {len(plan)} runs would not end in time, so every run has "
                             f"{its} iterations (the probe run is kept apart as 'probe', not in the results)")
                print(f"=== {notes[-1]}", flush=True)
                iterations = {t: its for t in tasks}
                runs, i = [], 0
        write_partial(args.name, {**payload(args, runs, tasks, settings, iterations, notes, t_start, probe),
                                  "threads": threads, "load": quiet})
    import ray

    ray.shutdown()
    doc = payload(args, runs, tasks, settings, iterations, notes, t_start, probe)
    for t in tasks:
        _env.print_table(doc["table"][t], title=f"\n{t}: {iterations[t]} iterations per run, seeds {seeds}")
    for r in runs:
        if "error" in r:
            print(f"\n{r['task']} / {r['setting']} / seed {r['seed']} raised:\n{r['error']}")
    png = plot(runs, tasks, settings, str(_env.RESULTS_DIR / f"{args.name}.png"))
    print(f"figure: {os.path.relpath(png, _env.ROOT)}")
    key = {f"{t}/{s}": {k: round(row[k]["mean"], 4) for k in (f"eval_{'gold' if t == 'compare' else 'reward'}_after",
                                                             "kl_final", "s_per_it_median") if row[k]["mean"] is not None}
           for t in tasks for s, row in doc["per_setting"][t].items() if "n/a" not in row}
    key["total_minutes"] = round(doc["total_seconds"] / 60, 1)
    _env.save_results(args.name, {**doc, "threads": threads, "load": {**quiet, "end": _env.loadavg()},
                                  "figure": os.path.relpath(png, _env.ROOT)}, key)


if __name__ == "__main__":
    main()
