"""A PNG of a run's curves (reward, KL, value loss) from its metrics.jsonl."""

from __future__ import annotations

import os

from rlhf_ray.runtime.metrics import read_records


def read_metrics(path: str) -> list[dict]:
    return read_records(path)


def _plot_gold(ax, rows: list[dict], evals: list[dict]) -> None:
    """The gold check (reward.gold) on the reward panel, on its own axis at the right: the proxy
    reward and the gold check side by side, so over-optimisation of a reward model shows."""
    train = [(r["iteration"], r["gold_mean"]) for r in rows if "gold_mean" in r]
    held = [(r["iteration"], r["eval/gold_mean"]) for r in evals if "eval/gold_mean" in r]
    if not train and not held:
        return
    gx = ax.twinx()
    if train:
        gx.plot([p[0] for p in train], [p[1] for p in train], color="tab:green", linewidth=1, alpha=0.7,
                label="gold, training batches")
    if held:
        gx.plot([p[0] for p in held], [p[1] for p in held], "s-", color="darkgreen", markersize=4, linewidth=1,
                label="gold, held-out evaluation")
    gx.set_ylabel("gold check")
    if all(0.0 <= v <= 1.0 for _, v in train + held):  # an accuracy: the whole range, so changes read true
        gx.set_ylim(-0.02, 1.02)
    for line in ax.get_lines():  # one legend for both axes (the twin would hide the reward's)
        line.set_label(f"reward, {line.get_label()}")
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    handles, labels = ax.get_legend_handles_labels()
    more, more_labels = gx.get_legend_handles_labels()
    gx.legend(handles + more, labels + more_labels, fontsize=7, loc="lower right")


def write_plot(metrics_path: str, out_png: str,
               keys: tuple[str, ...] = ("reward_mean", "kl_mean", "value_loss"), eval_path: str | None = None) -> str:
    """Plot ``keys`` over iterations, one panel each, with the held-out evaluation's reward (from
    ``eval_path``, eval.jsonl) as points on the reward panel; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    if not rows:
        raise ValueError(f"{metrics_path} holds no metrics to plot")
    fig, axes = plt.subplots(len(keys), 1, figsize=(7, 2.4 * len(keys)), sharex=True)
    for ax, key in zip(axes, keys):
        pts = [(r["iteration"], r[key]) for r in rows if key in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1.2, label="training batches")
        evals = read_metrics(eval_path) if key == "reward_mean" and eval_path and os.path.isfile(eval_path) else []
        if evals:
            ax.plot([r["iteration"] for r in evals], [r["eval/reward_mean"] for r in evals], "o-", markersize=4,
                    linewidth=1, label="held-out evaluation")
            ax.legend(fontsize=8)
        if key == "reward_mean":
            _plot_gold(ax, rows, evals)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("iteration")
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(metrics_path))))
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
