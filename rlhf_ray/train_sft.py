"""Supervised fine-tuning (SFT) on Ray + DeepSpeed, the stage before PPO.

    python -m rlhf_ray.train_sft --config configs/sft_cpu.yaml [--section.field value ...]
    python -m rlhf_ray.train_sft --config configs/sft_cpu.yaml --dry-run     # resolved config, starts nothing
    RAY_ADDRESS=<head>:6379 python -m rlhf_ray.train_sft --config my.yaml   # attach to a running cluster

Reads prompt/response records (or chat messages) from a JSONL or Parquet file, applies the
length policy (counts printed), and trains a causal LM on the response tokens only (the prompt
is context, not a target) with ``learner.num_ranks`` DeepSpeed ZeRO ranks in Ray actors, the same
machinery as the PPO learner. Each epoch prints and appends to ``<train.output_dir>/metrics.jsonl``
the training loss and the held-out loss and token accuracy (row 0: before training). The result
is a standard Hugging Face checkpoint with its tokenizer in ``train.output_dir``: point PPO's
``--model.path`` at it.

``--train.checkpoint_every N`` saves resumable checkpoints; ``--train.resume true`` continues from the newest.

What it leaves out: sequence packing, LoRA/PEFT.
"""

from __future__ import annotations

import sys

from rlhf_ray.supervised.config import SFTRunConfig, validate_sft

KEYS = ("train/loss", "train/token_accuracy", "eval/loss", "eval/token_accuracy", "train/seconds")


def prepare(cfg: SFTRunConfig):
    """Everything checked before Ray starts: the model, the data files, tokenisation and counts.
    Returns the tokenised data."""
    from transformers import AutoTokenizer

    from rlhf_ray.supervised.data import load_sft_data
    from rlhf_ray.supervised.run import check_train_size, prepare_demo_data, prepare_model

    prepare_model(cfg)
    prepare_demo_data(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    data = load_sft_data(cfg.data, tokenizer, cfg.seed)
    for split, stats in data.stats.items():
        print(f"sft data ({split}): {stats.describe()} (--data.max_len {cfg.data.max_len}, "
              f"--data.too_long {cfg.data.too_long})")
    check_train_size(len(data.train), cfg, "examples")
    return data


def train_sft(cfg: SFTRunConfig, ray_address: str | None = None) -> dict:
    """Run SFT to the end; returns the summary (first/last losses, held-out metrics)."""
    from rlhf_ray.supervised.run import run_supervised
    from rlhf_ray.supervised.actors import SFTTrainerActor

    data = prepare(cfg)
    summary = run_supervised(cfg, SFTTrainerActor, "sft", data.train, data.eval, cfg.model.path, KEYS, ray_address)
    after = summary["eval_after"]
    print(f"sft done: train loss {summary['train_loss_first_step']:.4f} (first step) -> "
          f"{summary['train_loss_last_epoch']:.4f} (last epoch); held-out loss "
          f"{summary['eval_before'].get('loss', float('nan')):.4f} -> {after.get('loss', float('nan')):.4f}; "
          f"model: {summary['output_dir']}")
    return summary


def main(argv: list[str] | None = None) -> int:
    from rlhf_ray.supervised.run import cli_main

    return cli_main("python -m rlhf_ray.train_sft", "Supervised fine-tuning on Ray + DeepSpeed.", SFTRunConfig, validate_sft, train_sft, argv)


if __name__ == "__main__":
    sys.exit(main())
