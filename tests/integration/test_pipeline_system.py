"""The asynchronous pipeline on the real roles (vLLM CPU engine, DeepSpeed learners, reference and
reward actors): rollout.max_staleness 2 with partial rollouts, an evaluation and checkpoints in
the middle, and the engine, the reward (the scoring stage's) and then a learner rank killed
mid-pipeline.

Here the learners are the slow stage (the generation waits for new versions), so the syncs come
while the generation thread waits and no response spans two versions; tests/unit/test_pipeline.py
forces a sync between two segments and checks the version tags across it."""

from __future__ import annotations

import json
import os

import pytest

from rlhf_ray.data.prompts import PromptSampler
from tests.integration.conftest import small_config
from tests.integration.test_faults import _kill_after

pytestmark = pytest.mark.integration


def test_pipeline_with_partial_rollouts_survives_kills_and_trains_every_prompt_once(ray_cluster, tiny_llama,
                                                                                   tmp_path):
    from rlhf_ray.coordinator.run import run

    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    cfg = small_config(tiny_llama, **{
        "rollout.max_staleness": 2, "rollout.partial_rollout_tokens": 3, "ppo.iterations": 8,
        "eval.every": 4, "eval.holdout": 4, "checkpoint.every": 3, "sync.timeout_s": 60,
        "learner.lr": 5e-3})  # updates large enough that versions differ visibly
    assert cfg.ppo.rollout_correction == "tis"
    killer = _kill_after(run_dir, [(2, "rollout engine 0"), (3, "reward"), (5, "learner rank 1")])
    summary = run(cfg, run_dir)
    killer.join(timeout=5)
    assert summary["completed"]
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        rows = [json.loads(line) for line in fh]
    assert [r["iteration"] for r in rows] == list(range(8))  # nothing lost, nothing doubled
    assert rows[-1]["faults/actor_restarts"] == 2 and rows[-1]["faults/learner_restarts"] == 1
    # every prompt trained once, in the sampler's order, across the failures and the restart
    from rlhf_ray.coordinator.preflight import prepare_inputs

    sampler = PromptSampler(len(prepare_inputs(cfg).prompts.token_ids), cfg.seed, cfg.data.shuffle)
    assert [r["prompt_indices"] for r in rows] == [sampler.next(cfg.rollout.prompts_per_iteration) for _ in rows]
    assert all(r["staleness/max"] <= 2 for r in rows)
    assert any(r["staleness/max"] >= 1 for r in rows)  # it did run ahead
    # correction weights are reported; tokens sampled by the learner's own version agree with it
    assert all("correction/weight_mean" in r for r in rows)
    fresh = [r["logprob_mismatch_fresh_max"] for r in rows if "logprob_mismatch_fresh_max" in r]
    assert fresh and max(fresh) < 2e-3, fresh
    assert any(r["logprob_mismatch_max"] > 1e-3 for r in rows if r["staleness/max"] >= 1)
    with open(os.path.join(run_dir, "eval.jsonl")) as fh:
        assert [json.loads(line)["iteration"] for line in fh] == [0, 4, 8]
