"""Where per-iteration metrics go: metrics.jsonl, TensorBoard, Weights & Biases (optional), Ray
custom metrics (dashboard / Prometheus) and the terminal; a PPO run's records of them
(``Records``) and its summary.

Ray custom metrics: the gauge for ``reward_mean`` is created as ``rlhf_reward_mean`` and Ray 2.60
exports every custom metric with its own ``ray_`` prefix, so Prometheus (and a PromQL query) sees
``ray_rlhf_reward_mean``: ``EXPORTED_PREFIX`` is the name users type, printed at start.
"""

from __future__ import annotations

import json
import math
import os
import re
from typing import Any, Callable

GAUGE_PREFIX = "rlhf_"
EXPORTED_PREFIX = "ray_" + GAUGE_PREFIX  # Ray prefixes custom metrics with "ray_" on export


def gauge_name(key: str) -> str:
    """The Ray gauge's name for a metric key (``time/generate`` -> ``rlhf_time_generate``)."""
    return GAUGE_PREFIX + re.sub(r"[^a-zA-Z0-9_]", "_", key)


def exported_name(key: str) -> str:
    """The name Prometheus shows for a metric key (``ray_rlhf_time_generate``)."""
    return "ray_" + gauge_name(key)


def _parse(line: str) -> dict | None:
    """One record, or None for a blank line or one cut short by a crash while it was written."""
    try:
        row = json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def read_records(path: str) -> list[dict]:
    """The records of a JSONL metrics file; a last line cut short by a crash mid-write is skipped."""
    with open(path) as fh:
        return [row for line in fh if (row := _parse(line)) is not None]


class MetricsSink:
    """One JSONL file plus its mirrors: TensorBoard, Ray gauges, and ``extra`` (e.g. a W&B run's
    ``log``), each called with the record's finite numbers."""

    def __init__(self, run_dir: str, tensorboard: bool = True, ray_metrics: bool = True,
                 filename: str = "metrics.jsonl", extra: Callable[[dict[str, float]], None] | None = None) -> None:
        os.makedirs(run_dir, exist_ok=True)
        self.path = os.path.join(run_dir, filename)
        self._fh = open(self.path, "a", buffering=1)
        self._tb_dir = os.path.join(run_dir, "tensorboard") if tensorboard else None
        self._tb = self._open_tensorboard()
        self._gauges: dict[str, Any] | None = {} if ray_metrics else None
        self._extra = extra

    def _open_tensorboard(self, purge_from: int | None = None):
        """A TensorBoard writer (None without tensorboard). With ``purge_from``, its event file
        starts with a restart marker at that step: TensorBoard then drops the events of that step
        and later written before it (``SummaryWriter``'s ``purge_step``)."""
        if self._tb_dir is None:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard not installed: JSONL still has everything
            return None
        return SummaryWriter(self._tb_dir, purge_step=purge_from)

    def _gauge(self, key: str):
        from ray.util.metrics import Gauge

        assert self._gauges is not None
        if key not in self._gauges:
            self._gauges[key] = Gauge(gauge_name(key), description=f"rlhf_ray per-iteration metric {key}")
        return self._gauges[key]

    def write(self, metrics: dict[str, Any]) -> None:
        self._fh.write(json.dumps(metrics, default=float) + "\n")
        step = int(metrics["iteration"])
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self._extra is not None:
            self._extra(scalars)
        for key, value in scalars.items():
            if self._tb is not None:
                self._tb.add_scalar(key, value, step)
            if self._gauges is not None:
                try:
                    self._gauge(key).set(float(value))
                except Exception:  # Ray not initialised (e.g. in-process tests): skip the gauge
                    self._gauges = None
        if self._tb is not None:
            self._tb.flush()

    def truncate_from(self, iteration: int) -> None:
        """Drop records of ``iteration`` and later (they will be redone after a restart from a
        checkpoint, or after a resume), so the file keeps exactly one record per iteration, and
        TensorBoard one point per step (without the restart marker a curve would show both runs,
        zig-zagging back in time)."""
        self._fh.close()
        with open(self.path) as fh:
            keep = [line for line in fh if (row := _parse(line)) is not None and row.get("iteration", iteration) < iteration]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as fh:
            fh.writelines(keep)
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a", buffering=1)
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open_tensorboard(iteration)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()


def format_line(m: dict[str, Any]) -> str:
    keys = [("reward_mean", "reward"), ("kl_mean", "kl"), ("policy_loss", "pg"), ("value_loss", "vf"),
            ("clip_fraction", "clip"), ("response_length", "len"), ("time/iteration", "s/it")]
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
