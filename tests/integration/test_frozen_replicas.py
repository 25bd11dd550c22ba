"""Two reference and two reward replicas on the local cluster: PPO iterations run, each replica
scores its part, and the joined results are what one replica computes over the whole batch."""

from __future__ import annotations

import math

import pytest

from tests.integration.conftest import small_config

pytestmark = pytest.mark.integration


def test_two_reference_and_two_reward_replicas_give_the_one_replica_results(ray_cluster, tiny_llama):
    import torch

    from rlhf_ray.coordinator.loop import PPOCoordinator
    from rlhf_ray.coordinator.preflight import prepare_inputs
    from rlhf_ray.runtime.groups import ReferenceClient, RewardClient, Roles, SharedBatch

    cfg = small_config(tiny_llama, **{"reference.replicas": 2, "reward.replicas": 2, "reward.concurrency": 2,
                                      "ppo.iterations": 2})
    inputs = prepare_inputs(cfg)
    roles = Roles(cfg)
    try:
        names = ("reference", "reference replica 1", "reward", "reward replica 1")
        assert all(name in roles.placement for name in names), sorted(roles.placement)
        assert len({roles.placement[name]["pid"] for name in names}) == 4  # four processes
        coord = PPOCoordinator(cfg, inputs.prompts, inputs.pad_id, inputs.eos_ids, roles.rollout, roles.reference,
                               roles.reward, roles.learners, roles.weight_sync, put=SharedBatch)
        rows = [coord.step() for _ in range(2)]
        assert [r["iteration"] for r in rows] == [0, 1] and all(r["samples"] == 16 for r in rows)
        for r in rows:
            for key in ("reward_mean", "kl_mean", "policy_loss", "value_loss"):
                assert math.isfinite(r[key]), key
            assert r["skipped_samples"] == 0

        batch, temperature = coord.last_batch, cfg.rollout.temperature
        shared = SharedBatch(batch)
        ref_pending, reward_pending = roles.reference.logprobs(shared, temperature), roles.reward.score(shared)
        assert ref_pending.sources == [("reference", 0), ("reference", 1)]  # both replicas took a part
        assert reward_pending.sources == [("reward", 0), ("reward", 1)]
        split_ref, split_scores = ref_pending.result(), reward_pending.result()
        # What the iteration used is what the replicas give now (nothing reordered between rows).
        torch.testing.assert_close(split_ref, batch.ref_logprobs, rtol=0, atol=1e-6)
        torch.testing.assert_close(split_scores, batch.scores, rtol=0, atol=0)
        # One replica over the whole batch (a one-replica run): the same numbers, up to the float
        # error of other micro-batches (packed rows of other sequences).
        timeout = cfg.resources.call_timeout_s
        for k in (0, 1):
            alone = SharedBatch(batch)
            reference = ReferenceClient([roles.reference.actors[k]], timeout)
            torch.testing.assert_close(reference.logprobs(alone, temperature).result(), split_ref, rtol=0, atol=1e-5)
            reward = RewardClient([roles.reward.actors[k]], timeout, by_tokens=False)
            torch.testing.assert_close(reward.score(alone).result(), split_scores, rtol=0, atol=0)
    finally:
        roles.shutdown()
