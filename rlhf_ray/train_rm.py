"""Reward-model training (Bradley-Terry) on Ray + DeepSpeed, the scorer PPO optimises against.

    python -m rlhf_ray.train_rm --config configs/rm_cpu.yaml [--section.field value ...]
    python -m rlhf_ray.train_rm --config configs/rm_cpu.yaml --dry-run     # resolved config, starts nothing
    RAY_ADDRESS=<head>:6379 python -m rlhf_ray.train_rm --config my.yaml   # attach to a running cluster

Reads preference pairs (prompt, chosen, rejected; or chat conversations) from a JSONL or Parquet
file and trains a sequence-classification model with one label (a new score head on the
``model.path`` body, usually the SFT model) with the pairwise loss
``-log sigmoid(r_chosen - r_rejected)`` on ``learner.num_ranks`` DeepSpeed ZeRO ranks in Ray actors.
Each side is tokenised as ``prompt + response``, exactly as PPO's reward actor scores. Each epoch
prints and appends to ``<train.output_dir>/metrics.jsonl`` the training loss and the held-out
pairwise accuracy (share of pairs with r_chosen > r_rejected; row 0: before training). The result
is a Hugging Face checkpoint with its tokenizer: point PPO at it with ``--reward.kind model
--reward.model_path <train.output_dir>``.

``--train.checkpoint_every N`` saves resumable checkpoints; ``--train.resume true`` continues from the newest.

What it leaves out: ensembles, reward centring/normalisation terms.
"""

from __future__ import annotations

import os
import sys

from rlhf_ray.supervised.config import RMRunConfig, validate_rm

KEYS = ("train/loss", "train/accuracy", "eval/loss", "eval/accuracy", "eval/reward_gap", "train/seconds")


def prepare(cfg: RMRunConfig):
    """Everything checked before Ray starts; returns the tokenised pairs."""
    from transformers import AutoTokenizer

    from rlhf_ray.supervised.data import load_preference_data
    from rlhf_ray.supervised.run import check_train_size, prepare_demo_data, prepare_model

    prepare_model(cfg)
    prepare_demo_data(cfg)
    _note_new_head(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    data = load_preference_data(cfg.data, tokenizer, cfg.seed)
    for split, stats in data.stats.items():
        print(f"rm data ({split}): {stats.describe()} (--data.max_len {cfg.data.max_len}, "
              f"--data.too_long {cfg.data.too_long})")
    check_train_size(len(data.train), cfg, "pairs")
    return data


def _note_new_head(path: str) -> None:
    import json

    with open(os.path.join(path, "config.json")) as fh:
        archs = json.load(fh).get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        print(f"rm: a new one-label score head goes on the body of {path} ({', '.join(archs) or 'unknown'}), "
              "whose LM head is left out; any other weight that does not load is listed.")


def train_rm(cfg: RMRunConfig, ray_address: str | None = None) -> dict:
    """Train the reward model to the end; returns the summary (held-out accuracy before/after)."""
    from rlhf_ray.supervised.run import run_supervised
    from rlhf_ray.supervised.actors import RewardModelTrainerActor

    data = prepare(cfg)
    summary = run_supervised(cfg, RewardModelTrainerActor, "rm", data.train, data.eval, cfg.model.path, KEYS,
                             ray_address)
    before, after = summary["eval_before"], summary["eval_after"]
    print(f"rm done: held-out pairwise accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f} on "
          f"{len(data.eval)} pairs (chance 0.5); train loss {summary['train_loss_first_step']:.4f} (first step) -> "
          f"{summary['train_loss_last_epoch']:.4f} (last epoch); model: {summary['output_dir']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.supervised.run import cli_main

    return cli_main("python -m rlhf_ray.train_rm", "Bradley-Terry reward model on Ray + DeepSpeed.", RMRunConfig, validate_rm, train_rm, argv)


if __name__ == "__main__":
    sys.exit(main())
