"""The PPO loop as a list of timed phases.

One iteration::

    prompts   -> generate (rollout engines)
              -> score    (reference logprobs | reward | learner old logprobs + values, in parallel)
              -> advantages (KL-shaped rewards, GAE, whitening: pure functions, here)
              -> update   (learner ranks, each on its own slice)
              -> sync     (policy weights learner rank 0 -> engines)

The coordinator talks to roles through the small Protocols below, so tests can drive it
with in-process fakes. It owns everything that must be global: the prompt order, the KL
controller, score normalisation, advantage whitening and the metrics.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Protocol

import torch

from rlhf_ray.algorithms import (AdaptiveKLController, FixedKLController, RunningMoments, apply_missing_eos_penalty,
                                 clip_scores, compute_gae, explained_variance, kl_estimate, masked_mean,
                                 masked_whiten, normalize_scores, shape_token_rewards)
from rlhf_ray.batch import ExperienceBatch, pack_generation
from rlhf_ray.config import Config, resolve
from rlhf_ray.coordinator.pending import Pending
from rlhf_ray.data.prompts import PromptSampler, PromptSet
from rlhf_ray.workers.rollout import SamplingSpec


class Rollout(Protocol):
    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Pending: ...


class Reference(Protocol):
    def logprobs(self, batch_ref, temperature: float) -> Pending: ...


class Reward(Protocol):
    def score(self, batch_ref) -> Pending: ...


class Learners(Protocol):
    def compute_old(self, batch: ExperienceBatch) -> Pending: ...
    def train(self, batch: ExperienceBatch, iteration: int) -> Pending: ...


class Sync(Protocol):
    def sync(self) -> dict[str, float]: ...


class NonFiniteError(RuntimeError):
    pass


class PPOCoordinator:
    def __init__(self, cfg: Config, prompts: PromptSet, pad_id: int, eos_ids: list[int], rollout: Rollout,
                 reference: Reference, reward: Reward, learners: Learners, weight_sync: Sync,
                 put=lambda x: x) -> None:
        self.cfg, self.prompts, self.pad_id, self.eos_ids = cfg, prompts, pad_id, eos_ids
        self.rollout, self.reference, self.reward = rollout, reference, reward
        self.learners, self.weight_sync = learners, weight_sync
        self.put = put  # ray.put in the real system: the batch is shared by reference and reward
        self.sizes = resolve(cfg)
        self.spec = SamplingSpec.from_config(cfg)
        self.sampler = PromptSampler(len(prompts.token_ids), cfg.seed, cfg.data.shuffle)
        p = cfg.ppo
        self.kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target
                       else FixedKLController(p.kl_coef))
        self.score_moments = RunningMoments()
        self.iteration = 0
        self._times: dict[str, float] = {}
        self._prompt_indices: list[int] = []

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        yield
        self._times[f"time/{name}"] = time.perf_counter() - t0

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict[str, float]:
        """Run one PPO iteration; returns its metrics."""
        self._times = {}
        t_start = time.perf_counter()
        with self._phase("generate"):
            batch = self._generate()
        with self._phase("score"):
            batch = self._score(batch)
        with self._phase("advantages"):
            batch, adv_metrics = self._advantages(batch)
        with self._phase("update"):
            train_metrics = self.learners.train(batch, self.iteration).result()
        with self._phase("sync"):
            sync_metrics = self.weight_sync.sync()
        self._times["time/iteration"] = time.perf_counter() - t_start
        metrics = {"iteration": self.iteration, "prompt_indices": self._prompt_indices, **self._batch_metrics(batch), **adv_metrics, **train_metrics,
                   **sync_metrics, **self._times}
        metrics["tokens_per_second"] = metrics["response_tokens"] / self._times["time/iteration"]
        metrics["samples_per_second"] = len(batch) / self._times["time/iteration"]
        metrics["generate_tokens_per_second"] = metrics["response_tokens"] / max(self._times["time/generate"], 1e-9)
        self.iteration += 1
        return metrics

    def _generate(self) -> ExperienceBatch:
        idx = self.sampler.next(self.cfg.rollout.prompts_per_iteration)
        self._prompt_indices = idx
        gen = self.rollout.generate([self.prompts.token_ids[i] for i in idx], self.spec).result()
        return pack_generation(gen, self.pad_id, self.eos_ids)

    def _score(self, batch: ExperienceBatch) -> ExperienceBatch:
        """Reference logprobs, reward and old logprobs/values, all three in flight at once."""
        shared = self.put(batch)
        ref = self.reference.logprobs(shared, self.cfg.rollout.temperature)
        rew = self.reward.score(shared)
        old = self.learners.compute_old(batch)
        old_logprobs, old_values = old.result()
        return batch.replace(ref_logprobs=ref.result(), scores=rew.result(), old_logprobs=old_logprobs,
                             old_values=old_values)

    def _advantages(self, batch: ExperienceBatch) -> tuple[ExperienceBatch, dict[str, float]]:
        p, r = self.cfg.ppo, self.cfg.reward
        mask = batch.response_mask
        for name in ("scores", "ref_logprobs", "old_logprobs", "old_values"):
            if not torch.isfinite(getattr(batch, name)).all():
                raise NonFiniteError(f"non-finite values in {name} at iteration {self.iteration}")
        scores = apply_missing_eos_penalty(batch.scores, batch.truncated, r.missing_eos_penalty)
        scores = clip_scores(scores, r.clip)
        if r.normalize:
            self.score_moments.update(scores)
            scores = normalize_scores(scores, self.score_moments.mean, self.score_moments.std)
        kl = kl_estimate(batch.old_logprobs, batch.ref_logprobs, p.kl_estimator) * mask
        kl_coef = self.kl_ctl.value
        rewards = shape_token_rewards(scores, kl, mask, kl_coef)
        gae = compute_gae(rewards, batch.old_values, mask, p.gamma, p.lam)
        advantages = masked_whiten(gae.advantages, mask) if p.whiten_advantages else gae.advantages
        kl_per_seq = kl.sum(-1)
        self.kl_ctl.update(float(kl_per_seq.mean()), len(batch))
        metrics = {
            "kl_mean": float(kl_per_seq.mean()),
            "kl_coef": float(kl_coef),
            "shaped_reward_mean": float(rewards.sum(-1).mean()),
            "advantage_mean_raw": float(masked_mean(gae.advantages, mask)),
            "return_mean": float(masked_mean(gae.returns, mask)),
            "value_mean": float(masked_mean(batch.old_values, mask)),
            "explained_variance": float(explained_variance(batch.old_values, gae.returns, mask)),
        }
        return batch.replace(advantages=advantages, returns=gae.returns), metrics

    def _batch_metrics(self, batch: ExperienceBatch) -> dict[str, float]:
        mask = batch.response_mask
        lengths = mask.sum(-1).float()
        diff = (batch.rollout_logprobs - batch.old_logprobs).abs().masked_fill(~mask, 0)
        return {
            "reward_mean": float(batch.scores.mean()),
            "reward_std": float(batch.scores.std()) if len(batch) > 1 else 0.0,
            "response_length": float(lengths.mean()),
            "truncation_rate": float(batch.truncated.float().mean()),
            "response_tokens": float(mask.sum()),
            "samples": float(len(batch)),
            # Same tokens, same weights: rollout and learner must agree (sync verification).
            "logprob_mismatch_mean": float(diff.sum() / mask.sum().clamp(min=1)),
            "logprob_mismatch_max": float(diff.max()),
        }

    # ------------------------------------------------------------------ state for checkpoints
    def state_dict(self) -> dict:
        return {"iteration": self.iteration, "sampler": self.sampler.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
