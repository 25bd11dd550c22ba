"""The Ray shells of the supervised trainers (``ray.remote`` around the plain classes in
``trainer.py``): the only module under ``supervised/`` besides ``run.py`` that needs Ray."""

from __future__ import annotations

import ray

from rlhf_ray.supervised.trainer import RewardModelTrainer, SFTTrainer

SFTTrainerActor = ray.remote(SFTTrainer)
RewardModelTrainerActor = ray.remote(RewardModelTrainer)
