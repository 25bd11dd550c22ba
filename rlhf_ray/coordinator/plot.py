"""A PNG of a run's curves (reward, KL, value loss) from its metrics.jsonl."""

from __future__ import annotations

import json
import os


def read_metrics(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_plot(metrics_path: str, out_png: str,
               keys: tuple[str, ...] = ("reward_mean", "kl_mean", "value_loss")) -> str:
    """Plot ``keys`` over iterations, one panel each; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path} holds no metrics to plot")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True)
    for ax, key in zip(axes, keys):
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("iteration")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
