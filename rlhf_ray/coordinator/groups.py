"""Handles on the running roles, as the coordinator sees them.

Each class wraps the Ray actors of one role and turns a logical call ("generate these
prompts", "train on this batch") into per-actor calls on pre-sliced inputs, returning a
``Pending``. Experience goes to learner ranks through the object store, one slice each.
"""

from __future__ import annotations

import ray
import torch

from rlhf_ray.backends.vllm import engine_env
from rlhf_ray.batch import ExperienceBatch, Generation
from rlhf_ray.config import Config
from rlhf_ray.coordinator.pending import Pending, RayPending
from rlhf_ray.coordinator.placement import actor_options, create_groups, placement_plan
from rlhf_ray.weight_sync.plan import Bucket, plan_buckets
from rlhf_ray.workers.frozen import ReferenceActor, RewardActor
from rlhf_ray.workers.learner import LearnerActor
from rlhf_ray.workers.rollout import RolloutActor, SamplingSpec


def base_env(threads: int) -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


class RolloutGroup:
    def __init__(self, actors: list, timeout_s: float) -> None:
        self.actors, self.timeout_s = actors, timeout_s

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Pending[Generation]:
        """Split prompts evenly over engines; results come back in prompt order."""
        k = len(self.actors)
        per = -(-len(prompt_ids) // k)
        refs, labels = [], []
        for i, actor in enumerate(self.actors):
            idx = list(range(i * per, min(len(prompt_ids), (i + 1) * per)))
            if idx:
                refs.append(actor.generate.remote([prompt_ids[j] for j in idx], idx, spec))
                labels.append(f"rollout engine {i}")
        return RayPending(refs, labels, "generate", self.timeout_s, Generation.concat)


class ReferenceClient:
    def __init__(self, actor, timeout_s: float) -> None:
        self.actor, self.timeout_s = actor, timeout_s

    def logprobs(self, batch_ref, temperature: float) -> Pending[torch.Tensor]:
        return RayPending([self.actor.logprobs.remote(batch_ref, temperature)], ["reference"],
                          "reference logprobs", self.timeout_s, lambda xs: xs[0])


class RewardClient:
    def __init__(self, actor, timeout_s: float) -> None:
        self.actor, self.timeout_s = actor, timeout_s

    def score(self, batch_ref) -> Pending[torch.Tensor]:
        return RayPending([self.actor.score.remote(batch_ref)], ["reward"], "reward scoring", self.timeout_s,
                          lambda xs: xs[0])


class LearnerGroup:
    def __init__(self, actors: list, timeout_s: float) -> None:
        self.actors, self.timeout_s = actors, timeout_s

    def _labels(self) -> list[str]:
        return [f"learner rank {i}" for i in range(len(self.actors))]

    def _all(self, what: str, refs: list, combine=lambda xs: xs) -> Pending:
        return RayPending(refs, self._labels(), what, self.timeout_s, combine)

    def setup(self) -> Pending[list[dict]]:
        addr, port = ray.get(self.actors[0].master_address.remote(), timeout=self.timeout_s)
        return self._all("learner set-up", [a.setup.remote(addr, port) for a in self.actors])

    def _slices(self, batch: ExperienceBatch) -> list:
        # One object per rank: no rank receives (or deserialises) the whole batch.
        return [ray.put(part) for part in batch.split(len(self.actors))]

    def compute_old(self, batch: ExperienceBatch) -> Pending[tuple[torch.Tensor, torch.Tensor]]:
        refs = [a.compute_old.remote(s) for a, s in zip(self.actors, self._slices(batch))]

        def cat(parts):
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        return self._all("old logprobs/values", refs, cat)

    def train(self, batch: ExperienceBatch, iteration: int) -> Pending[dict[str, float]]:
        refs = [a.train.remote(s, iteration) for a, s in zip(self.actors, self._slices(batch))]

        def mean(parts: list[dict]) -> dict[str, float]:
            return {k: sum(p[k] for p in parts) / len(parts) for k in parts[0]}

        return self._all("PPO update", refs, mean)

    def save_checkpoint(self, path: str, tokenizer_path: str | None) -> Pending[list]:
        return self._all("save checkpoint", [a.save_checkpoint.remote(path, tokenizer_path) for a in self.actors])

    def load_checkpoint(self, path: str) -> Pending[list]:
        return self._all("load checkpoint", [a.load_checkpoint.remote(path) for a in self.actors])

    def policy_state_dict(self) -> Pending[dict]:
        return self._all("gather policy weights", [a.policy_state_dict.remote() for a in self.actors],
                         lambda xs: xs[0])


class WeightSync:
    """Learner rank 0 -> every rollout engine, over the configured transport."""

    def __init__(self, cfg: Config, learners: LearnerGroup, engines: list) -> None:
        self.cfg, self.learners, self.engines = cfg, learners, engines
        specs = ray.get(learners.actors[0].weight_specs.remote(), timeout=learners.timeout_s)
        self.buckets: list[Bucket] = plan_buckets(specs, int(cfg.sync.bucket_mb * 2**20))
        self.nbytes = sum(b.nbytes for b in self.buckets)
        if cfg.sync.transport == "collective":
            self._init_group()

    def _init_group(self) -> None:
        timeout = self.cfg.sync.timeout_s
        addr, port = ray.get(self.learners.actors[0].sync_address.remote(), timeout=timeout)
        world = 1 + len(self.engines)
        from rlhf_ray.backends.deepspeed import dist_backend

        refs = [a.init_sync_group.remote(addr, port, world, timeout) for a in self.learners.actors]
        refs += [e.init_sync_group.remote(addr, port, i + 1, world, dist_backend(), timeout)
                 for i, e in enumerate(self.engines)]
        labels = self.learners._labels() + [f"rollout engine {i}" for i in range(len(self.engines))]
        RayPending(refs, labels, "weight-sync group set-up", timeout).result()

    def sync(self) -> dict[str, float]:
        """Send the current policy to every engine; returns bytes moved."""
        timeout = self.cfg.sync.timeout_s
        engine_labels = [f"rollout engine {i}" for i in range(len(self.engines))]
        if self.cfg.sync.transport == "collective":
            refs = [a.broadcast_weights.remote(self.buckets) for a in self.learners.actors]
            refs += [e.receive_broadcast.remote(self.buckets) for e in self.engines]
            RayPending(refs, self.learners._labels() + engine_labels, "weight sync", timeout).result()
        else:
            blob_lists = RayPending([a.export_blobs.remote(self.buckets) for a in self.learners.actors],
                                    self.learners._labels(), "weight sync (export)", timeout).result()
            refs = [e.load_blobs.remote(blob_lists[0]) for e in self.engines]
            RayPending(refs, engine_labels, "weight sync (load)", timeout).result()
        return {"sync_bytes": float(self.nbytes)}


class Roles:
    """All actors of a run, created in their placement groups and named by role and rank."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        res, timeout = cfg.resources, cfg.resources.call_timeout_s
        self.pgs = create_groups(placement_plan(cfg), res.placement_timeout_s)
        engine_env_vars = {**base_env(res.rollout.threads), **engine_env(cfg)}
        self.engines = [RolloutActor.options(**actor_options(self.pgs["rollout"], i, res.rollout, f"rollout-{i}",
                                                             engine_env_vars)).remote(cfg, i)
                        for i in range(cfg.rollout.num_engines)]
        self.reference_actor = ReferenceActor.options(**actor_options(
            self.pgs["reference"], 0, res.reference, "reference-0", base_env(res.reference.threads))).remote(cfg, 0)
        self.reward_actor = RewardActor.options(**actor_options(
            self.pgs["reward"], 0, res.reward, "reward-0", base_env(res.reward.threads))).remote(cfg, 0)
        n = cfg.learner.num_ranks
        learner_actors = [LearnerActor.options(**actor_options(self.pgs["learner"], i, res.learner, f"learner-{i}",
                                                               base_env(res.learner.threads))).remote(cfg, i, n)
                          for i in range(n)]
        self.rollout = RolloutGroup(self.engines, timeout)
        self.reference = ReferenceClient(self.reference_actor, timeout)
        self.reward = RewardClient(self.reward_actor, timeout)
        self.learners = LearnerGroup(learner_actors, timeout)
        self.learner_info = self.learners.setup().result()
        # Engines, reference and reward load in their constructors; make sure they are up.
        labelled = self.labelled_actors()
        pings = RayPending([a.ping.remote() for _, a in labelled], [label for label, _ in labelled],
                           "role start-up", timeout).result()
        self.placement = {label: ping for (label, _), ping in zip(labelled, pings)}
        self.weight_sync = WeightSync(cfg, self.learners, self.engines)

    def labelled_actors(self) -> list[tuple[str, object]]:
        return ([(f"rollout engine {i}", e) for i, e in enumerate(self.engines)]
                + [("reference", self.reference_actor), ("reward", self.reward_actor)]
                + [(f"learner rank {i}", a) for i, a in enumerate(self.learners.actors)])

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for _, actor in self.labelled_actors():
            ray.kill(actor, no_restart=True)
        for pg in self.pgs.values():
            remove_placement_group(pg)
