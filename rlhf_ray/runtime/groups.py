"""Handles on the running PPO roles, as the PPO driver (``coordinator/``) sees them.

Each client wraps the Ray actors of one role and turns a logical call ("generate these
prompts", "train on this batch") into per-actor calls on pre-sliced inputs, returning a
``Pending``. Experience goes to learner ranks through the object store, one slice each.
``Roles`` creates every actor in its placement group, named by role and rank, and replaces
actors that died.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import ray
import torch

from rlhf_ray.backends.engine import dist_backend
from rlhf_ray.backends.rollout import RolloutSpec, rollout_env
from rlhf_ray.batch import ExperienceBatch, Generation, TrainUpdate, join_rows, token_balanced_parts
from rlhf_ray.config import Config
from rlhf_ray.config.validate import reference_from_learner
from rlhf_ray.reward_calls import slice_columns
from rlhf_ray.runtime.cluster import base_env, collective_interface
from rlhf_ray.runtime.pending import Pending, RayPending, RemoteCallError, Source, attribute_failure, describe
from rlhf_ray.runtime.placement import (actor_options, create_groups, fits_some_node, on_one_node, placement_plan,
                                        role_bundle)
from rlhf_ray.weight_sync.plan import Bucket, plan_buckets
from rlhf_ray.workers.actors import LearnerActor, ReferenceActor, RewardActor, RolloutActor
from rlhf_ray.workers.frozen import ReferenceSpec, RewardSpec
from rlhf_ray.workers.learner import LearnerSpec, combine_rank_metrics
from rlhf_ray.workers.rollout import SamplingSpec


class RolloutGroup:
    def __init__(self, actors: list, timeout_s: float) -> None:
        self.actors, self.timeout_s = actors, timeout_s

    def generate(self, prompt_ids: list[list[int]], spec: SamplingSpec) -> Pending[Generation]:
        """Split prompts evenly over engines; results come back in prompt order."""
        k = len(self.actors)
        per = -(-len(prompt_ids) // k)
        refs, sources = [], []
        for i, actor in enumerate(self.actors):
            idx = list(range(i * per, min(len(prompt_ids), (i + 1) * per)))
            if idx:
                refs.append(actor.generate.remote([prompt_ids[j] for j in idx], idx, spec))
                sources.append(("rollout", i))
        return RayPending(refs, sources, "generate", self.timeout_s, Generation.concat)

    def engine_calls(self) -> list[Callable[[list[list[int]], SamplingSpec], Pending[Generation]]]:
        """One generate callable per engine (multi-turn episodes share turns out engine by engine)."""
        def call(i: int, actor) -> Callable[[list[list[int]], SamplingSpec], Pending[Generation]]:
            return lambda prompt_ids, spec: RayPending(
                [actor.generate.remote(prompt_ids, list(range(len(prompt_ids))), spec)], [("rollout", i)],
                "generate", self.timeout_s, lambda parts: parts[0])
        return [call(i, actor) for i, actor in enumerate(self.actors)]


class SharedBatch:
    """One batch as the coordinator hands it to the reference and reward clients (its ``put``): the
    batch itself, from which each client plans its replicas' parts, and each part put in the object
    store once, by whichever client asks first. With one replica per role (the default) both roles
    read the same object, the whole batch; so do two roles split the same way.

    ``put``: ``ray.put`` (the default), or a stand-in for tests."""

    def __init__(self, batch: ExperienceBatch, put: Callable[[ExperienceBatch], Any] | None = None) -> None:
        self.batch = batch
        self._put = put or ray.put
        self._refs: dict[tuple[int, ...], Any] = {}

    def __len__(self) -> int:
        return len(self.batch)

    def part(self, rows: Sequence[int]):
        """The object-store reference of the rows ``rows`` (ascending) of the batch."""
        key = tuple(rows)
        if key not in self._refs:
            whole = key == tuple(range(len(self.batch)))
            self._refs[key] = self._put(self.batch if whole else self.batch.select(torch.tensor(key)))
        return self._refs[key]

    def whole(self):
        return self.part(range(len(self.batch)))


class FrozenReplicas:
    """The replicas of a frozen role (reference or reward): a call on a batch becomes one call per
    replica on a part of it, the parts of similar weight (``token_balanced_parts``: tokens, or one
    per sample with ``by_tokens`` False), at most one part per row; results are put back in the
    batch's order (``join_rows``). A replica that fails is named in the error by its index."""

    role = "frozen"
    what = "frozen role call"

    def __init__(self, actors: list, timeout_s: float, by_tokens: bool = True) -> None:
        self.actors, self.timeout_s, self.by_tokens = actors, timeout_s, by_tokens

    def parts(self, batch: ExperienceBatch) -> list[list[int]]:
        """Row indices of each replica's part: as many parts as replicas, fewer when B is smaller."""
        weights = batch.attention_mask.sum(-1).tolist() if self.by_tokens else [1] * len(batch)
        return token_balanced_parts(weights, min(len(self.actors), len(batch)))

    def _call(self, shared: SharedBatch, method: Callable, *args, columns: dict[str, list] | None = None
              ) -> Pending[torch.Tensor]:
        """``method(actor).remote(part, *args)`` for each replica and its part; with ``columns`` (one
        value per row of the batch), ``method(actor).remote(part, *args, the part's rows of them)``."""
        parts = self.parts(shared.batch)
        extra = [(slice_columns(columns, rows),) if columns else () for rows in parts]
        refs = [method(self.actors[k]).remote(shared.part(rows), *args, *extra[k]) for k, rows in enumerate(parts)]
        return RayPending(refs, [(self.role, k) for k in range(len(parts))], self.what, self.timeout_s,
                          lambda values: join_rows(parts, values))


class ReferenceClient(FrozenReplicas):
    """reference.replicas reference actors; parts of similar token counts."""

    role, what = "reference", "reference logprobs"

    def logprobs(self, shared: SharedBatch, temperature: float) -> Pending[torch.Tensor]:
        """(B, R) reference logprobs of ``shared``'s batch."""
        return self._call(shared, lambda actor: actor.logprobs, temperature)


class LearnerReferenceClient:
    """Reference logprobs from the learner ranks, each over its slice of the batch, with the LoRA
    adapters off (the base model; reference.from_learner): no reference actor, no second copy."""

    actors: list = []  # no actor of its own

    def __init__(self, learners: "LearnerGroup") -> None:
        self.learners = learners

    def logprobs(self, shared: SharedBatch, temperature: float) -> Pending[torch.Tensor]:
        batch_ref = shared.whole()  # each rank computes its own slice of it
        refs = [a.reference_logprobs.remote(batch_ref, temperature) for a in self.learners.actors]
        return RayPending(refs, self.learners.sources(), "reference logprobs (learners, adapters off)",
                          self.learners.timeout_s, torch.cat)


class RewardClient(FrozenReplicas):
    """reward.replicas reward actors. A reward model's parts hold similar token counts (its cost is
    a forward pass); a function's or endpoint's similar sample counts (its cost is per call)."""

    role, what = "reward", "reward scoring"

    def score(self, shared: SharedBatch, fields: dict[str, list] | None = None) -> Pending[torch.Tensor]:
        """(B,) scores of ``shared``'s batch. ``fields``: the prompt records' fields, a column of one
        value per row (``PromptSet.columns``); each replica gets its part's rows of every column."""
        if fields:
            for name, values in fields.items():
                if len(values) != len(shared):
                    raise ValueError(f"field {name!r} has {len(values)} values for a batch of {len(shared)} rows")
        return self._call(shared, lambda actor: actor.score, columns=fields)


class LearnerGroup:
    def __init__(self, actors: list, timeout_s: float) -> None:
        self.actors, self.timeout_s = actors, timeout_s

    def sources(self) -> list[Source]:
        return [("learner", i) for i in range(len(self.actors))]

    def _all(self, what: str, refs: list, combine=lambda xs: xs) -> Pending:
        return RayPending(refs, self.sources(), what, self.timeout_s, combine)

    def setup(self) -> Pending[list[dict]]:
        loopback = on_one_node(self._all("learner ping", [a.ping.remote() for a in self.actors]).result())
        addr, port = RayPending([self.actors[0].master_address.remote(loopback)], [("learner", 0)],
                                "learner address", self.timeout_s, lambda xs: xs[0]).result()
        return self._all("learner set-up", [a.setup.remote(addr, port) for a in self.actors])

    def _slices(self, batch: ExperienceBatch) -> list:
        # One object per rank: no rank receives (or deserialises) the whole batch.
        return [ray.put(part) for part in batch.split(len(self.actors))]

    def compute_old(self, batch: ExperienceBatch) -> Pending[tuple[torch.Tensor, torch.Tensor]]:
        refs = [a.compute_old.remote(s) for a, s in zip(self.actors, self._slices(batch))]

        def cat(parts):
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

        return self._all("old logprobs/values", refs, cat)

    def train(self, update: TrainUpdate, iteration: int) -> Pending[dict[str, float]]:
        """Each rank trains on the slice it kept from ``compute_old``; only the update's fields
        (advantages, returns, mask) travel, one small object per rank."""
        refs = [a.train.remote(u, iteration) for a, u in zip(self.actors, update.split(len(self.actors)))]

        return self._all("PPO update", refs, combine_rank_metrics)

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
        specs = RayPending([learners.actors[0].weight_specs.remote()], [("learner", 0)], "weight specs",
                           learners.timeout_s, lambda xs: xs[0]).result()
        self.buckets: list[Bucket] = plan_buckets(specs, int(cfg.sync.bucket_mb * 2**20))
        self.partial = RayPending([learners.actors[0].sync_is_partial.remote()], [("learner", 0)], "sync plan",
                                  learners.timeout_s, lambda xs: xs[0]).result()
        self.nbytes = sum(b.nbytes for b in self.buckets)
        self.rebuild()

    def _engine_sources(self) -> list[Source]:
        return [("rollout", i) for i in range(len(self.engines))]

    def rebuild(self) -> None:
        """(Re)create the broadcast group: at start, and after an engine or learner was replaced.
        Each member aborts its old group first. The group's store listens on 127.0.0.1 when every
        member runs on learner rank 0's machine, else on that node's address."""
        if self.cfg.sync.transport != "collective":
            return
        timeout = self.cfg.sync.timeout_s
        members = [self.learners.actors[0], *self.engines]
        pings = RayPending([a.ping.remote() for a in members], [("learner", 0), *self._engine_sources()],
                           "sync group members", timeout).result()
        loopback = on_one_node(pings)
        addr, port = RayPending([self.learners.actors[0].sync_address.remote(loopback)], [("learner", 0)],
                                "sync address", timeout, lambda xs: xs[0]).result()
        world = 1 + len(self.engines)
        refs = [a.init_sync_group.remote(addr, port, world, timeout) for a in self.learners.actors]
        refs += [e.init_sync_group.remote(addr, port, i + 1, world, dist_backend(), timeout)
                 for i, e in enumerate(self.engines)]
        self._attributed(RayPending(refs, self.learners.sources() + self._engine_sources(),
                                    "weight-sync group set-up", timeout))

    def sync(self) -> dict[str, float]:
        """Send the current policy to every engine; returns bytes moved."""
        timeout = self.cfg.sync.timeout_s
        if self.cfg.sync.transport == "collective":
            refs = [a.broadcast_weights.remote(self.buckets) for a in self.learners.actors]
            refs += [e.receive_broadcast.remote(self.buckets, self.partial) for e in self.engines]
            self._attributed(RayPending(refs, self.learners.sources() + self._engine_sources(), "weight sync",
                                        timeout))
        else:
            exports = [a.export_arrays.remote(self.buckets) for a in self.learners.actors]
            ref_lists = self._attributed(RayPending(exports, self.learners.sources(), "weight sync (export)", timeout))
            refs = [e.load_arrays.remote(self.buckets, ref_lists[0], self.partial) for e in self.engines]
            self._attributed(RayPending(refs, self._engine_sources(), "weight sync (load)", timeout))
        return {"sync_bytes": float(self.nbytes)}

    def _attributed(self, pending: RayPending):
        """``pending.result()``; if it fails with an "error" or "timeout", the error names the member
        that is really dead or silent, if any (``attribute_failure``): an engine that dies in a sync
        first shows as an error of learner rank 0's broadcast, which alone would end the run (a
        role's error is not retried) instead of replacing the engine."""
        try:
            return pending.result()
        except RemoteCallError as exc:
            blamed = attribute_failure(exc, self._probe)
            if blamed is exc:
                raise
            raise blamed from exc

    def _probe(self) -> Pending[list]:
        """A ping of every learner rank and engine. A member that survived the failed call answers
        once it has left it: at the latest when its own wait gives up, sync.timeout_s after its last
        bucket arrived, so the probe waits that long and a margin before it calls a member silent."""
        members = [*zip(self.learners.sources(), self.learners.actors), *zip(self._engine_sources(), self.engines)]
        timeout = self.cfg.sync.timeout_s
        return RayPending([a.ping.remote() for _, a in members], [s for s, _ in members],
                          "ping of every weight-sync member after a failed call", timeout + min(timeout, 60.0))


class Roles:
    """All actors of a run, created in their placement groups and named by role and rank."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        timeout = cfg.resources.call_timeout_s
        self.pgs = create_groups(placement_plan(cfg), cfg.resources.placement_timeout_s)
        self.generation: dict[Source, int] = {}  # restarts per actor, for unique names
        self.engines: list = []
        self.rollout = RolloutGroup(self.engines, timeout)
        self.reward = RewardClient([], timeout, by_tokens=cfg.reward.kind == "model")
        self.learners = LearnerGroup([], timeout)
        self.reference_from_learner = reference_from_learner(cfg)
        self.reference = LearnerReferenceClient(self.learners) if self.reference_from_learner \
            else ReferenceClient([], timeout)
        self.placement: dict[str, dict] = {}
        # Each role's actor class and the spec it is built from (its own settings, not the tree).
        self.kinds = {"rollout": (RolloutActor, RolloutSpec.from_config(cfg)),
                      "reference": (ReferenceActor, ReferenceSpec.from_config(cfg)),
                      "reward": (RewardActor, RewardSpec.from_config(cfg)),
                      "learner": (LearnerActor, LearnerSpec.from_config(cfg))}
        try:
            self.engines += [self._spawn(("rollout", i)) for i in range(cfg.rollout.num_engines)]
            if not self.reference_from_learner:
                self.reference.actors += [self._spawn(("reference", i)) for i in range(cfg.reference.replicas)]
            self.reward.actors += [self._spawn(("reward", i)) for i in range(cfg.reward.replicas)]
            self._start_learners()
            self._ping(self.labelled_actors())
            self.weight_sync = WeightSync(cfg, self.learners, self.engines)
            replicas = cfg.reference.replicas
            print("reference logprobs: " + ("the learner ranks, policy with its LoRA adapters off (base model; no "
                                            "reference actor)" if self.reference_from_learner else
                                            (f"{replicas} reference actors" if replicas > 1 else "the reference actor")
                                            + f" ({cfg.reference.path or cfg.model.path})"))
        except BaseException:
            self.shutdown()  # never leave half a system holding the cluster's resources
            raise

    # ------------------------------------------------------------------ creating actors
    def _spawn(self, source: Source):
        """Start the actor of ``source`` in its placement bundle, from its role's spec."""
        role, i = source
        actor_cls, spec = self.kinds[role]
        res = getattr(self.cfg.resources, role)
        gen = self.generation.get(source, 0)
        name = f"{role}-{i}" + (f"-r{gen}" if gen else "")
        env = base_env(res.threads, collective_interface(self.cfg.resources.network_interface))
        if isinstance(spec, RolloutSpec):
            env.update(rollout_env(spec))
        return actor_cls.options(**actor_options(self.pgs[role], i, res, name, env)).remote(spec, i)

    def _start_learners(self) -> None:
        self.learners.actors[:] = [self._spawn(("learner", i)) for i in range(self.cfg.learner.num_ranks)]
        LearnerGroup(self.learners.actors, self.cfg.resources.startup_timeout_s).setup().result()

    def _ping(self, labelled: list[tuple[Source, object]]) -> None:
        """Wait until the actors are up (engines and frozen models load in their constructors)
        and record where each runs."""
        pings = RayPending([a.ping.remote() for _, a in labelled], [s for s, _ in labelled], "role start-up",
                           self.cfg.resources.startup_timeout_s).result()
        self.placement.update({describe(s): p for (s, _), p in zip(labelled, pings)})

    def labelled_actors(self) -> list[tuple[Source, object]]:
        return ([(("rollout", i), e) for i, e in enumerate(self.engines)]
                + [(("reference", i), a) for i, a in enumerate(self.reference.actors)]
                + [(("reward", i), a) for i, a in enumerate(self.reward.actors)]
                + [(("learner", i), a) for i, a in enumerate(self.learners.actors)])

    # ------------------------------------------------------------------ replacing actors
    def replace(self, source: Source) -> None:
        """Kill and re-create one rollout engine, reference or reward replica in its placement bundle
        (the others keep running). A new engine joins a rebuilt sync group; the next weight sync
        brings it the current policy. A frozen replica needs nothing more: it loads its model."""
        role, i = source
        holder = {"rollout": self.engines, "reference": self.reference.actors, "reward": self.reward.actors}[role]
        ray.kill(holder[i], no_restart=True)
        self.generation[source] = self.generation.get(source, 0) + 1
        holder[i] = self._spawn(source)
        self._ping([(source, holder[i])])
        if role == "rollout":
            self.weight_sync.rebuild()  # the caller marks weights stale: every engine is re-synced

    def restart_learners(self) -> None:
        """Kill every learner rank and start a fresh group (the caller loads a checkpoint)."""
        for a in self.learners.actors:
            ray.kill(a, no_restart=True)
        for i in range(self.cfg.learner.num_ranks):
            self.generation[("learner", i)] = self.generation.get(("learner", i), 0) + 1
        self._start_learners()
        self._ping([(("learner", i), a) for i, a in enumerate(self.learners.actors)])
        self.weight_sync.rebuild()

    def lost_node(self, source: Source) -> dict | None:
        """The node ``source``'s actor ran on, if Ray now reports that node dead (else None):
        ``node_id``, ``node_ip``, the role's ``bundle`` and whether a live node could hold a
        replacement (``replaceable``, ``fits_some_node``). Recovery stops the run at once when
        nothing could: a restart would wait for resources that left with the node."""
        where = self.placement.get(describe(source), {})
        nodes = ray.nodes()
        node = next((n for n in nodes if n["NodeID"] == where.get("node_id")), None)
        if node is None or node["Alive"]:
            return None
        bundle = role_bundle(getattr(self.cfg.resources, source[0]))
        live = [n["Resources"] for n in nodes if n["Alive"]]
        return {"node_id": node["NodeID"], "node_ip": node["NodeManagerAddress"], "bundle": bundle,
                "replaceable": fits_some_node(bundle, live)}

    def shutdown(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for actor in [*self.engines, *self.reference.actors, *self.reward.actors, *self.learners.actors]:
            ray.kill(actor, no_restart=True)
        for pg in self.pgs.values():
            remove_placement_group(pg)
