"""How long a run takes to start, per phase (printed at start and saved as ``<run_dir>/startup.json``;
``python -m benchmarks.startup`` breaks the roles phase down per actor)."""

from __future__ import annotations

import json
import time


class StartupClock:
    """Seconds per start-up phase, from the launcher's start to the first iteration: imports, inputs (models,
    tokenizer, prompts, reward probe), ray (start or attach), roles (actors: process start and
    imports, model loads, engine build and compilation, DeepSpeed init, sync group), coordinator."""

    def __init__(self, started_at: float | None = None) -> None:
        self.t0 = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}
        if started_at is not None:  # the launcher's imports (torch, transformers, Ray) come first
            self.t0 = self.last = started_at
            self.lap("imports")

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase], self.last = now - self.last, now

    def line(self) -> str:
        parts = ", ".join(f"{k} {v:.1f} s" for k, v in self.phases.items())
        return f"start-up {self.last - self.t0:.1f} s ({parts})"

    def save(self, path: str) -> None:
        with open(path, "w") as fh:
            json.dump({"total_s": self.last - self.t0, **{f"{k}_s": v for k, v in self.phases.items()}}, fh, indent=2)
