"""Where a stage's per-iteration (or per-epoch) metrics go: a JSONL file, TensorBoard, Weights &
Biases (optional) and Ray custom metrics (dashboard / Prometheus). The PPO run's records of them,
its terminal lines and its summary are ``coordinator/records.py``; the supervised stages write
through ``MetricsSink`` too.

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
