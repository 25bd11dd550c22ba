"""The Ray shells of the role classes: each is ``ray.remote`` around a plain class.

This is the only module under ``workers/`` that imports Ray at module level, so the role
logic stays importable (and testable) where Ray is not installed.
"""

from __future__ import annotations

import ray

from rlhf_ray.workers.frozen import ReferenceModel, RewardScorer
from rlhf_ray.workers.learner import Learner
from rlhf_ray.workers.rollout import RolloutEngine

RolloutActor = ray.remote(RolloutEngine)
ReferenceActor = ray.remote(ReferenceModel)
RewardActor = ray.remote(RewardScorer)
LearnerActor = ray.remote(Learner)
