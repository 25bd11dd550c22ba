"""The stages before PPO: supervised fine-tuning (SFT) and reward-model (RM) training.

They stand beside the PPO layers and share only the low-level pieces (the learner section of
the config, ``data/records.py`` (JSONL/Parquet reading, shared with PPO's prompt files),
the training engine of ``backends/engine.py``, ``checkpoint_files.py``, the Ray runtime):

    config.py    the SFT, RM and pipeline config trees (``validate_sft``, ``validate_rm``, ...)
    data.py      tokenised SFT examples and preference pairs, the length policy, train/eval splits
    trainer.py   one data-parallel rank of SFT or RM training on the TrainEngine (plain classes)
    actors.py    their Ray shells
    run.py       the driver: CLI, the trainer group in a placement group, the epoch loop, summary

Entry points: ``python -m rlhf_ray.train_sft``, ``python -m rlhf_ray.train_rm``,
``python -m rlhf_ray.pipeline``.
"""
