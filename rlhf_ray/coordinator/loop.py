"""The PPO loop as a list of timed phases.

One iteration, on-policy (``rollout.max_staleness`` 0)::

    sync      (policy weights learner rank 0 -> engines, when the last update changed them)
    prompts   -> generate (rollout engines)
              -> score    (reference logprobs | reward | learner old logprobs + values, in parallel)
              -> advantages (KL-shaped rewards, GAE, whitening: pure functions, here)
              -> update   (learner ranks, each on its own slice)

With ``rollout.max_staleness`` k >= 1 the generation and the frozen roles' scoring run ahead on
threads of their own (``coordinator/pipeline.py``), up to k policy versions ahead, and an
iteration is the learner stage: sync, wait_batch (the next scored batch), old_logprobs,
advantages, update.

The coordinator talks to roles through the small Protocols below, so tests can drive it
with in-process fakes. It owns everything that must be global: the prompt order, the KL
controller, score normalisation, advantage whitening and the metrics.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from contextlib import contextmanager
from typing import Iterator, Protocol

import torch

from rlhf_ray.algorithms import (AdaptiveKLController, FixedKLController, RunningMoments, apply_missing_eos_penalty,
                                 clip_scores, kl_estimate, normalize_scores, overlong_penalty)
from rlhf_ray.batch import ExperienceBatch, Generation, TrainUpdate, pack_generation
from rlhf_ray.config import Config, resolve
from rlhf_ray.config.validate import reference_from_learner
from rlhf_ray.coordinator.advantages import estimate_advantages
from rlhf_ray.coordinator.dynamic_sampling import varied_groups
from rlhf_ray.coordinator.episodes import Background, episode_metrics, episode_runner, prompt_record
from rlhf_ray.coordinator.pipeline import BatchPipeline, EngineVersion, Slot, generate_in_segments, staleness_metrics
from rlhf_ray.data.prompts import PromptSampler, PromptSet
from rlhf_ray.runtime.pending import Pending, RemoteCallError
from rlhf_ray.workers.rollout import SamplingSpec


class Rollout(Protocol):
    """The rollout engines as one: ``generate`` shares the prompts out over them. For multi-turn
    episodes a rollout may also offer ``engine_calls() -> list[EngineCall]`` (one generate callable
    per engine, ``runtime.groups.RolloutGroup``), so that episodes spread over the engines turn by
    turn; without it ``generate`` serves as one engine."""

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Pending: ...


class Reference(Protocol):
    def logprobs(self, batch_ref, temperature: float) -> Pending: ...


class Reward(Protocol):
    def score(self, batch_ref) -> Pending: ...


class Learners(Protocol):
    def compute_old(self, batch: ExperienceBatch) -> Pending: ...  # each rank keeps its slice
    def train(self, update: TrainUpdate, iteration: int) -> Pending: ...


class Sync(Protocol):
    def sync(self) -> dict[str, float]: ...


class NonFiniteError(RuntimeError):
    """Every sample of several consecutive iterations was unusable (NaN/inf)."""


class SyncMismatchError(RuntimeError):
    """Rollout and learner logprobs disagree beyond sync.max_logprob_mismatch."""


class PPOCoordinator:
    def __init__(self, cfg: Config, prompts: PromptSet, pad_id: int, eos_ids: list[int], rollout: Rollout,
                 reference: Reference, reward: Reward, learners: Learners, weight_sync: Sync,
                 put=lambda x: x, eval_prompts: PromptSet | None = None, tokenizer=None) -> None:
        self.cfg, self.prompts, self.pad_id, self.eos_ids = cfg, prompts, pad_id, eos_ids
        self.rollout, self.reference, self.reward = rollout, reference, reward
        self.learners, self.weight_sync = learners, weight_sync
        self.put = put  # runtime.groups.SharedBatch in the real system: reference and reward share the batch
        self.sizes = resolve(cfg)
        self.spec = SamplingSpec.from_config(cfg)
        ev = cfg.eval
        self.eval_prompts = eval_prompts
        self.eval_spec = SamplingSpec(ev.samples_per_prompt, ev.max_new_tokens or cfg.rollout.max_new_tokens,
                                      ev.temperature, 1.0, -1, tuple(cfg.rollout.stop_token_ids), logprobs=False,
                                      stop=tuple(cfg.rollout.stop))
        self.sampler = PromptSampler(len(prompts.token_ids), cfg.seed, cfg.data.shuffle)
        p = cfg.ppo
        self.kl_ctl = (AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target
                       else FixedKLController(p.kl_coef))
        self.score_moments = RunningMoments()
        self.iteration = 0
        self.bad_iterations = 0
        self.weights_stale = False
        self.last_batch: ExperienceBatch | None = None
        self._times: dict[str, float] = {}
        self._events: list[list] = []  # this iteration's [lane, phase, start, end], seconds since t0
        self.t0 = time.perf_counter()
        self._prompt_indices: list[int] = []
        self.row_prompts: list[int] = []  # the prompt (index into ``prompts``) of each sample of the batch
        self.episodes = episode_runner(cfg, tokenizer) if cfg.rollout.env else None
        # Versions: the updates that changed the policy; the engines' version tags every sampled token.
        self.policy_version = 0
        self.engines = EngineVersion()
        self.staleness = cfg.rollout.staleness
        self._lock = threading.RLock()  # the prompt sampler and the pipeline's prompts, read and drawn as one
        self._pending_prompts: list[list[int]] = []  # drawn, not trained: generated first when the pipeline starts
        self._frozen_reference = not reference_from_learner(cfg)  # else the learners compute it, on this thread
        self.pipeline = None if self.staleness == 0 else BatchPipeline(
            self.staleness, self.engines, self._draw, self._generate_ahead, self._score_ahead, self._lock, self.t0)

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        with _named(name):
            yield
        t1 = time.perf_counter()
        self._times[f"time/{name}"] = t1 - t0
        self._events.append([_LANES.get(name, "coordinator"), name, t0 - self.t0, t1 - self.t0])

    @property
    def pending_prompts(self) -> list[list[int]]:
        """The prompts of the batches drawn and not trained yet, in order (the pipeline's; [] on-policy)."""
        with self._lock:
            running = self.pipeline is not None and self.pipeline.running
            return [list(p) for p in (self.pipeline.pending if running else self._pending_prompts)]

    def _draw(self) -> list[int]:
        with self._lock:
            return self.sampler.next(self.cfg.rollout.prompts_per_iteration)

    def _checks_logprobs(self, iteration: int) -> bool:
        """Whether the batch of ``iteration`` carries the engines' logprobs: every iteration with an
        off-policy correction (it needs them), else every sync.check_logprobs_every."""
        if self.cfg.ppo.rollout_correction != "none":
            return True
        every = self.cfg.sync.check_logprobs_every
        return every > 0 and iteration % every == 0

    def _spec(self, iteration: int) -> SamplingSpec:
        return dataclasses.replace(self.spec, logprobs=self._checks_logprobs(iteration))

    def _generate(self, prompts: PromptSet, idx: list[int], spec: SamplingSpec, segment: int = 0) -> Pending:
        """Samples for the prompts ``idx`` of ``prompts``: one response each, or with rollout.env an
        episode each (run in a background thread, the engines shared out turn by turn); every token
        tagged with the engines' version. ``segment`` > 0: responses sampled that many tokens at a
        time (partial rollouts, :func:`generate_in_segments`)."""
        ids = [prompts.token_ids[i] for i in idx]
        tagged = self.engines.tagged
        if self.episodes is None:
            if segment:
                return Background(lambda: generate_in_segments(tagged(self.rollout.generate), ids, spec, segment))
            return tagged(self.rollout.generate)(ids, spec)
        calls = self.rollout.engine_calls() if hasattr(self.rollout, "engine_calls") else [self.rollout.generate]
        records = [prompt_record(prompts, i) for i in idx]
        return Background(lambda: self.episodes.run([tagged(c) for c in calls], ids, records, spec))

    def _generate_ahead(self, idx: list[int], iteration: int):
        """The pipeline's generation stage: the batch of prompts ``idx``, trained at ``iteration``."""
        with _named("generate"):
            return self._generate(self.prompts, idx, self._spec(iteration),
                                  self.cfg.rollout.partial_rollout_tokens).result()

    def _score_ahead(self, slot: Slot):
        """The pipeline's scoring stage: the frozen roles' part of :meth:`_score` (reference logprobs,
        unless the learners compute them, and the reward, both in flight at once). With dynamic
        sampling only the scores: the learner stage picks the groups, then scores what it kept."""
        gen = slot.gen
        batch = pack_generation(gen, self.pad_id, self.eos_ids)
        with _named("score"):
            shared = self.put(batch)
            ref = (self.reference.logprobs(shared, self.cfg.rollout.temperature)
                   if self._frozen_reference and not self.cfg.ppo.dynamic_sampling else None)
            scores = self._reward_score(shared, self.prompts, [slot.prompts[g] for g in gen.prompt_index]).result()
            if self.cfg.ppo.dynamic_sampling:
                return scores
            return batch.replace(scores=scores, ref_logprobs=ref.result() if ref is not None else None)

    def _reward_score(self, shared, prompts: PromptSet, rows: list[int]) -> Pending:
        """The reward of a batch whose row j answers prompt ``rows[j]`` of ``prompts``: with the
        prompt records' other fields (an expected answer) as keyword columns when they have any."""
        fields = prompts.columns(rows)
        return self.reward.score(shared, fields) if fields else self.reward.score(shared)

    def _critic_warmup(self) -> bool:
        """Whether this iteration warms the critic up (ppo.critic_warmup_iterations): the value
        trains alone and the policy stays as it is. A function of the iteration, which is
        checkpointed, so a run resumed inside the warm-up goes on warming up."""
        return self.iteration < self.cfg.ppo.critic_warmup_iterations

    def mark_weights_stale(self) -> None:
        """The engines must receive the learner's weights before the next generation (after a
        resume, or after the learner group was restarted from a checkpoint)."""
        self.weights_stale = True

    # ------------------------------------------------------------------ one iteration
    def step(self) -> dict[str, float]:
        """Run one PPO iteration; returns its metrics.

        The weight sync that follows an update runs at the start of the next step (before its
        generation), so every step is all-or-nothing: if any role fails, the coordinator's state
        is rolled back and the same step can be retried with the same prompts."""
        snapshot = self.state_dict()
        try:
            return self._step()
        except BaseException:
            self.load_state_dict(snapshot)
            raise

    def _sync_if_stale(self) -> dict[str, float]:
        if not self.weights_stale:
            return {}
        with self._phase("sync"):
            out = self.engines.sync(self.weight_sync.sync, self.policy_version)
        self.weights_stale = False
        return out

    def _step(self) -> dict[str, float]:
        self._times, self._events = {"time/sync": 0.0}, []
        t_start = time.perf_counter()
        # The engines get the last update's weights first (on-policy: before they generate this batch).
        sync_metrics = self._sync_if_stale()
        gen, ahead, pipeline_metrics = self._next_generation()
        self.row_prompts = [self._prompt_indices[g] for g in gen.prompt_index]
        scores, sampling_metrics = None, {}
        if self.cfg.ppo.dynamic_sampling:
            with self._phase("dynamic_sampling"):
                gen, scores, sampling_metrics = self._varied_groups(gen, ahead)
            ahead = None
        batch = ahead if ahead is not None else pack_generation(gen, self.pad_id, self.eos_ids)
        sampling_metrics.update(episode_metrics(gen))
        fresh = None  # tokens sampled by the weights the learner holds now
        if gen.versions is not None and self.pipeline is not None:
            sampling_metrics.update(staleness_metrics(gen.versions, gen.action_masks, self.policy_version,
                                                      self.staleness))
            fresh = torch.zeros(batch.response_mask.shape, dtype=torch.bool)
            for j, vs in enumerate(gen.versions):
                fresh[j, :len(vs)] = torch.tensor(vs) == self.policy_version
        with self._phase("score" if self.pipeline is None else "old_logprobs"):
            batch = self._score(batch, scores)
        with self._phase("advantages"):
            batch, adv_metrics = self._advantages(batch)
        warmup = self._critic_warmup()
        changed = False
        if adv_metrics["skipped_samples"] == len(batch):
            train_metrics = {"skipped_update": 1.0}
        else:
            with self._phase("update"):
                # Each rank kept its slice from compute_old: only the new fields travel.
                # With the KL in the loss the ranks also need the reference logprobs and this
                # iteration's coefficient (the one the metrics report).
                in_loss = self.cfg.ppo.kl_in == "loss"
                update = TrainUpdate.of(batch, with_ref=in_loss, kl_coef=adv_metrics["kl_coef"] if in_loss else 0.0,
                                        value_only=warmup)
                train_metrics = self.learners.train(update, self.iteration).result()
            # A warm-up leaves the policy as it is: the engines already hold its weights.
            changed = not warmup
        if self.cfg.ppo.critic_warmup_iterations:
            train_metrics = {**train_metrics, "critic_warmup": float(warmup)}
        self._times["time/iteration"] = time.perf_counter() - t_start
        metrics = {"iteration": self.iteration, "prompt_indices": self._prompt_indices, "policy_version": self.policy_version,
                   **self._batch_metrics(batch, fresh), **adv_metrics, **train_metrics, **sync_metrics, **sampling_metrics,
                   **pipeline_metrics, **self._times, "timeline": self._events}
        self._check_sync(metrics)
        metrics["tokens_per_second"] = metrics["response_tokens"] / self._times["time/iteration"]
        metrics["samples_per_second"] = len(batch) / self._times["time/iteration"]
        metrics["generate_tokens_per_second"] = metrics["response_tokens"] / max(self._times["time/generate"], 1e-9)
        self.last_batch = batch
        self.weights_stale = self.weights_stale or changed
        self.policy_version += int(changed)
        if self.pipeline is not None:
            self.pipeline.trained(changed)
        self.iteration += 1
        return metrics

    def _next_generation(self) -> tuple[Generation, ExperienceBatch | torch.Tensor | None, dict]:
        """This iteration's samples. On-policy: prompts drawn and generated now. In the pipeline: the
        next batch it generated and scored ahead (started first if it is not running), with what
        the scoring stage made of it (a packed batch with its reference logprobs and scores, or with
        dynamic sampling the scores), and its stages' times and events."""
        if self.pipeline is None:  # (prompts pending from a pipeline's checkpoint first)
            self._prompt_indices = self._pending_prompts.pop(0) if self._pending_prompts else self._draw()
            with self._phase("generate"):
                return self._generate(self.prompts, self._prompt_indices, self._spec(self.iteration)).result(), None, {}
        if not self.pipeline.running:
            with self._lock:
                self.pipeline.start(self.iteration, self.policy_version, self._pending_prompts)
        t0 = time.perf_counter()
        slot, metrics = self.pipeline.take()
        self._events.append(["coordinator", "wait_batch", t0 - self.t0, time.perf_counter() - self.t0])
        self._events += slot.events
        self._times.update(slot.times)
        self._prompt_indices = slot.prompts
        return slot.gen, slot.scored, metrics

    def close(self) -> None:
        """Stop the pipeline's threads (the batches in flight are dropped; their prompts stay pending)."""
        if self.pipeline is not None:
            with self._lock:
                self._pending_prompts = self.pending_prompts
            self.pipeline.stop()

    # ------------------------------------------------------------------ evaluation
    def evaluate(self) -> tuple[dict[str, float], ExperienceBatch]:
        """The policy after ``self.iteration`` updates on the evaluation prompts: the engines get the
        latest weights, generate with eval's sampling settings (greedy by default), and the reward
        role scores the responses. Training state (prompt order, KL controller, score moments) is
        not touched. In the pipeline its generation call in flight ends first and what it generated
        is kept for the next steps (see ``_pause_pipeline``); if a role fails here, the pipeline is
        stopped and starts again from the prompts pending. Returns (metrics, the scored batch)."""
        if self.eval_prompts is None:
            raise ValueError("this coordinator has no evaluation prompts; set --eval.every > 0.")
        try:
            return self._evaluate(self._pause_pipeline())
        except BaseException:
            self.close()  # a role failed: the next step starts the pipeline again, from the prompts pending
            raise
        finally:
            if self.pipeline is not None:
                self.pipeline.resume()

    def _evaluate(self, waited: float) -> tuple[dict[str, float], ExperienceBatch]:
        t0 = time.perf_counter()
        self._sync_if_stale()
        gen = self._generate(self.eval_prompts, list(range(len(self.eval_prompts.token_ids))), self.eval_spec).result()
        batch = pack_generation(gen, self.pad_id, self.eos_ids)
        # every evaluation prompt once, in order: a row's group id is its prompt's index
        scores = self._reward_score(self.put(batch), self.eval_prompts, list(gen.prompt_index)).result()
        finite = torch.isfinite(scores)
        good = scores[finite]
        metrics = {
            "iteration": self.iteration,
            "eval/reward_mean": float(good.mean()) if len(good) else float("nan"),
            "eval/reward_std": float(good.std()) if len(good) > 1 else 0.0,
            "eval/response_length": float(batch.response_mask.sum(-1).float().mean()),
            "eval/truncation_rate": float(batch.truncated.float().mean()),
            "eval/samples": float(len(batch)),
            "eval/nonfinite_scores": float((~finite).sum()),
            "time/eval": time.perf_counter() - t0,
            "time/eval_wait_generation": waited,  # the pipeline's generation call, awaited before the sync
            **episode_metrics(gen, "eval/episode/"),
        }
        return metrics, batch.replace(scores=scores)

    def _pause_pipeline(self) -> float:
        """The pipeline starts no new batch and its generation call in flight ends; what it generated
        stays for the next steps, which train on it as if evaluation had not happened. Otherwise the
        evaluation's weight sync would queue behind that generation on the engines (an actor runs
        one call at a time) while learner rank 0 already waits in the broadcast, so the
        generation's time would count against sync.timeout_s. Returns the seconds waited."""
        if self.pipeline is None or not self.pipeline.running:
            return 0.0
        t0 = time.perf_counter()
        self.pipeline.pause()
        return time.perf_counter() - t0

    def _check_sync(self, metrics: dict) -> None:
        limit = self.cfg.sync.max_logprob_mismatch
        # In the pipeline the batch comes from older weights than the learner's, so the mismatch
        # measures that policy lag, not the sync: no limit applies.
        mismatch = metrics.get("logprob_mismatch_mean")  # absent on iterations that do not check
        if limit is not None and mismatch is not None and self.staleness == 0 and mismatch > limit:
            raise SyncMismatchError(
                f"iteration {self.iteration}: mean |rollout - learner| logprob {mismatch:.3g} "
                f"exceeds --sync.max_logprob_mismatch {limit}: the engines are not running the learner's weights "
                "(or sample at a different temperature). Check the sync transport, or unset the limit to only report.")

    def _score(self, batch: ExperienceBatch, scores: torch.Tensor | None = None) -> ExperienceBatch:
        """Reference logprobs, reward and old logprobs/values, all three in flight at once; the
        reference and the reward only where the batch lacks them (the pipeline's scoring stage, or
        dynamic sampling (``scores``), got them already)."""
        scores = batch.scores if scores is None else scores
        need_ref = batch.ref_logprobs is None
        shared = self.put(batch) if need_ref or scores is None else None
        ref = self.reference.logprobs(shared, self.cfg.rollout.temperature) if need_ref else None
        rew = self._reward_score(shared, self.prompts, self.row_prompts) if scores is None else None
        old = self.learners.compute_old(batch)
        old_logprobs, old_values = old.result()
        return batch.replace(ref_logprobs=ref.result() if ref is not None else batch.ref_logprobs,
                             scores=rew.result() if rew is not None else scores,
                             old_logprobs=old_logprobs, old_values=old_values)

    def _varied_groups(self, gen: Generation, scores: torch.Tensor | None = None
                       ) -> tuple[Generation, torch.Tensor, dict[str, float]]:
        """Dynamic sampling (``coordinator/dynamic_sampling.py``) over this iteration's samples;
        ``scores``: the first round's, if the pipeline scored it already. The extra rounds draw
        prompts (in the pipeline: between its batches' draws) and generate them on the newest
        weights. Returns the kept samples (group ids 0..P-1), their scores and the counts."""
        spec = self._spec(self.iteration)

        def score(g: Generation, prompts: list[int]) -> torch.Tensor:
            shared = self.put(pack_generation(g, self.pad_id, self.eos_ids))
            return self._reward_score(shared, self.prompts, [prompts[i] for i in g.prompt_index]).result()

        def more() -> tuple[list[int], Generation]:
            idx = self._draw()
            return idx, self._generate(self.prompts, idx, spec, self.cfg.rollout.partial_rollout_tokens).result()

        out = varied_groups(gen, self._prompt_indices, self.cfg.rollout.prompts_per_iteration,
                            self.cfg.ppo.max_extra_generations, score, more, scores)
        self._prompt_indices = list(self._prompt_indices) + out.extra_prompts
        self.row_prompts = out.row_prompts
        return out.gen, out.scores, out.metrics

    def _quarantine(self, batch: ExperienceBatch) -> tuple[ExperienceBatch, int]:
        """Samples with NaN/inf in their score, reference/old logprobs or values are kept in the
        batch (shapes stay divisible over ranks) but neutralised: their inputs are zeroed and their
        response mask cleared after advantages are computed, so they contribute nothing."""
        mask = batch.response_mask
        bad = ~torch.isfinite(batch.scores)
        for name in ("ref_logprobs", "old_logprobs", "old_values"):
            bad |= (~torch.isfinite(getattr(batch, name)) & mask).any(-1)
        n_bad = int(bad.sum())
        if n_bad == len(batch):
            self.bad_iterations += 1
            if self.bad_iterations >= self.cfg.ppo.max_bad_iterations:
                raise NonFiniteError(
                    f"{self.bad_iterations} consecutive iterations had no usable sample (NaN/inf in rewards, "
                    "logprobs or values); stopping instead of training on garbage. Check the reward function "
                    "and the learning rate; --ppo.max_bad_iterations sets how many are tolerated.")
        else:
            self.bad_iterations = 0
        if n_bad:
            fix = {name: torch.where(bad.view(-1, *[1] * (getattr(batch, name).dim() - 1)),
                                     torch.zeros_like(getattr(batch, name)), getattr(batch, name)).nan_to_num(0.0)
                   for name in ("scores", "ref_logprobs", "old_logprobs", "old_values")}
            fix["ref_logprobs"] = torch.where(bad[:, None], fix["old_logprobs"], fix["ref_logprobs"])
            batch = batch.replace(**fix)
        return batch.replace(bad_rows=bad), n_bad

    def _prepared_scores(self, batch: ExperienceBatch) -> torch.Tensor:
        """(B,) scores after the missing-EOS and overlong penalties, clipping and normalisation. Only the
        valid samples' scores update the running moments: a quarantined sample's score is a stand-in 0."""
        p, r = self.cfg.ppo, self.cfg.reward
        scores = apply_missing_eos_penalty(batch.scores, batch.truncated, r.missing_eos_penalty)
        if p.overlong_buffer > 0:
            scores = scores + overlong_penalty(batch.response_mask.sum(-1), self.cfg.rollout.max_new_tokens,
                                               p.overlong_buffer, p.overlong_penalty)
        scores = clip_scores(scores, r.clip)
        if r.normalize:
            self.score_moments.update(scores[~batch.bad_rows])
            scores = normalize_scores(scores, self.score_moments.mean, self.score_moments.std)
        return scores

    def _advantages(self, batch: ExperienceBatch) -> tuple[ExperienceBatch, dict[str, float]]:
        p = self.cfg.ppo
        batch, n_bad = self._quarantine(batch)
        valid = ~batch.bad_rows
        mask = batch.response_mask
        scores = self._prepared_scores(batch)
        actions = batch.actions  # the policy's tokens: an episode's observations get no KL and no advantage
        kl = kl_estimate(batch.old_logprobs, batch.ref_logprobs, p.kl_estimator) * actions
        kl_coef = self.kl_ctl.value
        out = estimate_advantages(p, scores, kl, kl_coef, batch.old_values, batch.prompt_index, mask, valid,
                                  actions=batch.action_mask, turn_rewards=batch.turn_rewards)
        usable = valid if n_bad < len(batch) else torch.ones_like(valid)
        kl_per_seq = kl.sum(-1)[usable]
        kl_k2_per_seq = (kl_estimate(batch.old_logprobs, batch.ref_logprobs, "k2") * actions).sum(-1)[usable]
        if n_bad < len(batch) and not self._critic_warmup():  # a warm-up leaves the policy (and its KL) alone
            self.kl_ctl.update(float(kl_per_seq.mean()), len(batch) - n_bad)
        metrics = {
            "kl_mean": float(kl_per_seq.mean()),
            # k1 (the usual choice) is unbiased but its batch mean can be negative; k2 is >= 0
            # and zero only where policy and reference agree on every sampled token.
            "kl_k2_mean": float(kl_k2_per_seq.mean()),
            "kl_coef": float(kl_coef),
            **out.metrics,
            "skipped_samples": float(n_bad),
        }
        # From here on response_mask is the loss mask: the usable samples' actions (every learner
        # term, the metrics and the logprob check read it; the learner ranks keep the full one).
        good = actions & valid[:, None]
        return batch.replace(advantages=out.advantages, returns=out.returns, response_mask=good), metrics

    def _batch_metrics(self, batch: ExperienceBatch, fresh: torch.Tensor | None = None) -> dict[str, float]:
        """Metrics over the usable samples (quarantined NaN/inf samples are counted separately).
        logprob_mismatch_* only on the iterations whose batch carries the engines' logprobs; in the
        pipeline (``fresh``: (B, R) bool, the tokens sampled by the learner's current version) also
        over those tokens alone, where engine and learner must agree as on-policy."""
        mask = batch.response_mask
        good = ~batch.bad_rows if batch.bad_rows is not None else torch.ones(len(batch), dtype=torch.bool)
        if not good.any():
            metrics = {"samples": float(len(batch)), "response_tokens": 0.0, "reward_mean": float("nan")}
        else:
            scores = batch.scores[good]
            metrics = {
                "reward_mean": float(scores.mean()),
                "reward_std": float(scores.std()) if len(scores) > 1 else 0.0,
                "response_length": float(mask[good].sum(-1).float().mean()),
                "truncation_rate": float(batch.truncated[good].float().mean()),
                "response_tokens": float(mask.sum()),
                "samples": float(len(batch)),
            }
        if self._checks_logprobs(self.iteration):
            # Same tokens, same weights: rollout and learner must agree (sync verification).
            diff = (batch.rollout_logprobs - batch.old_logprobs).abs().masked_fill(~mask, 0)
            metrics["logprob_mismatch_mean"] = float(diff.sum() / mask.sum().clamp(min=1))
            metrics["logprob_mismatch_max"] = float(diff.max())
            if fresh is not None and bool((fresh & mask).any()):
                metrics["logprob_mismatch_fresh_max"] = float(diff[fresh & mask].max())
        return metrics

    # ------------------------------------------------------------------ state for checkpoints
    def state_dict(self) -> dict:
        with self._lock:  # the sampler and the prompts it gave the pipeline, as one
            return {"iteration": self.iteration, "sampler": self.sampler.state_dict(),
                    "kl_ctl": self.kl_ctl.state_dict(), "score_moments": self.score_moments.state_dict(),
                    "bad_iterations": self.bad_iterations, "pending_prompts": self.pending_prompts,
                    "policy_version": self.policy_version}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state["iteration"])
        self.sampler.load_state_dict(state["sampler"])
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.score_moments.load_state_dict(state["score_moments"])
        self.bad_iterations = int(state.get("bad_iterations", 0))
        # What the pipeline had in flight is not part of the state: after a rollback or a resume the
        # pending prompts are generated again, first and in order, on the current weights.
        self.close()
        with self._lock:
            self._pending_prompts = _prompt_lists(state.get("pending_prompts"))
        self.policy_version = int(state.get("policy_version", max(
            0, self.iteration - self.cfg.ppo.critic_warmup_iterations)))  # before versions were saved


def _prompt_lists(saved) -> list[list[int]]:
    """Pending prompts as saved: a list of prompt lists; one list or None before the pipeline."""
    if not saved:
        return []
    return [list(saved)] if isinstance(saved[0], int) else [list(p) for p in saved]


_LANES = {"generate": "engines", "dynamic_sampling": "engines", "score": "reference+reward",
          "old_logprobs": "learner", "update": "learner", "sync": "sync"}  # the timeline's rows


@contextmanager
def _named(phase: str) -> Iterator[None]:
    """A role's failure inside says in which phase it came."""
    try:
        yield
    except RemoteCallError as exc:
        exc.phase = exc.phase or phase
        raise

