"""A PPO run's records: metrics.jsonl and eval.jsonl through ``runtime.metrics.MetricsSink`` (with
TensorBoard, Ray gauges and W&B beside them), their in-memory history, the terminal lines of an
iteration and an evaluation, and the run's summary.
"""

from __future__ import annotations

import math
from typing import Any

from rlhf_ray.runtime.metrics import MetricsSink, read_records


def format_line(m: dict[str, Any]) -> str:
    keys = [("reward_mean", "reward"), ("kl_mean", "kl"), ("policy_loss", "pg"), ("value_loss", "vf"),
            ("clip_fraction", "clip"), ("response_length", "len"), ("staleness/mean", "stale"),
            ("time/iteration", "s/it")]
    parts = [f"it {m['iteration']}"]
    for k, short in keys:
        if k in m:
            parts.append(f"{short} {m[k]:.4g}")
    return "  ".join(parts)


def format_eval_line(m: dict[str, Any]) -> str:
    return (f"eval after {m['iteration']} iterations: reward {m['eval/reward_mean']:.4g}  "
            f"len {m['eval/response_length']:.4g}  truncated {m['eval/truncation_rate']:.2g}  "
            f"({int(m['eval/samples'])} responses, {m['time/eval']:.1f} s)")


def format_progress(done: int, total: int, elapsed_s: float, history: list[dict]) -> str:
    """The progress part of a plain line (no terminal to draw a bar on): iterations done of the
    run's total, elapsed time and the time left at the recent pace (last 10 iterations)."""
    recent = [r["time/iteration"] for r in history[-10:] if "time/iteration" in r]
    left = max(total - done, 0) * (sum(recent) / len(recent)) if recent else float("nan")
    return f"  [{done}/{total} {100.0 * done / max(total, 1):.0f}%, {_clock(elapsed_s)} elapsed, ~{_clock(left)} left]"


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    m, s = divmod(int(round(seconds)), 60)
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Records:
    """The run's per-iteration records (metrics.jsonl, eval.jsonl, TensorBoard) and their
    in-memory history; iterations that run again after a restart or a resume are forgotten
    first, so each file keeps one record per iteration."""

    def __init__(self, run_dir: str, tensorboard: bool, with_eval: bool, wandb=None) -> None:
        extra = wandb.log if wandb is not None else None
        self.wandb = wandb
        self.metrics = MetricsSink(run_dir, tensorboard=tensorboard, extra=extra)
        self.evals = (MetricsSink(run_dir, tensorboard=tensorboard, filename="eval.jsonl", extra=extra)
                      if with_eval else None)
        self.history: list[dict] = []
        self.eval_history: list[dict] = []
        self.evaluated_at = -1

    def add(self, metrics: dict) -> None:
        self.history.append(metrics)
        self.metrics.write(metrics)

    def add_eval(self, metrics: dict) -> None:
        self.eval_history.append(metrics)
        self.evaluated_at = int(metrics["iteration"])
        if self.evals is not None:
            self.evals.write(metrics)

    def recall(self) -> None:
        """Take the records already in the files (a resumed run's iterations before its checkpoint)
        into the history, so the summary covers the whole run, not only the part run since."""
        self.history[:] = read_records(self.metrics.path)
        if self.evals is not None:
            self.eval_history[:] = read_records(self.evals.path)
            self.evaluated_at = int(self.eval_history[-1]["iteration"]) if self.eval_history else -1

    def forget_from(self, iteration: int) -> None:
        """Iterations ``iteration`` and later run (again): drop their records and evaluations."""
        self.metrics.truncate_from(iteration)
        self.history[:] = [h for h in self.history if h["iteration"] < iteration]
        if self.evals is not None:
            self.evals.truncate_from(iteration)
            self.eval_history[:] = [h for h in self.eval_history if h["iteration"] < iteration]
            self.evaluated_at = min(self.evaluated_at, iteration - 1)

    def close(self) -> None:
        self.metrics.close()
        if self.evals is not None:
            self.evals.close()
        if self.wandb is not None:
            self.wandb.finish()


def summarize(history: list[dict], head: int = 5) -> dict:
    """Mean reward and KL over the first and last ``head`` iterations."""
    if not history:
        return {"iterations": 0}
    first, last = history[:head], history[-head:]

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    return {"iterations": len(history), "reward_start": mean(first, "reward_mean"),
            "reward_end": mean(last, "reward_mean"), "kl_start": mean(first, "kl_mean"),
            "kl_end": mean(last, "kl_mean"),
            "seconds_per_iteration": mean(history, "time/iteration")}


def print_summary(summary: dict) -> None:
    resumed = f" (resumed at iteration {summary['resumed_at']})" if "resumed_at" in summary else ""
    print(f"done: {summary['iterations']} iterations{resumed}, "
          f"reward {summary.get('reward_start', float('nan')):.3f} -> "
          f"{summary.get('reward_end', float('nan')):.3f}, KL {summary.get('kl_start', float('nan')):.3f} -> "
          f"{summary.get('kl_end', float('nan')):.3f} (means of the first and last 5 iterations); "
          f"plot: {summary.get('plot', 'none')}")
    if "eval" in summary:
        ev = summary["eval"]
        print(f"held-out evaluation ({ev['prompts']} prompts, temperature {ev['temperature']}): reward "
              f"{ev['first']['eval/reward_mean']:.3f} after {ev['first']['iteration']} iterations -> "
              f"{ev['last']['eval/reward_mean']:.3f} after {ev['last']['iteration']}")
