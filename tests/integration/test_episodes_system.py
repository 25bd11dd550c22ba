"""Multi-turn episodes on the real system: vLLM engine, reference, reward function and DeepSpeed
learner ranks on a local Ray cluster. Every episode has three turns and two observations
(tests/integration/three_turns.py); the learner's logprobs must match the engine's on every token
the policy sampled, in every turn, after each weight sync.

The same run is the ZeRO-3 case of tests/integration/test_ppo_system.py (its checks, on a run of
its own there before): ZeRO-3 learner ranks, the collective sync in 0.02 MiB buckets, which split
every layer's q/k/v and gate/up across buckets (the engine's one streaming reload must still load
each fused layer whole, with two buckets in flight), and a warm-up + cosine learning rate."""

from __future__ import annotations

import json
import math
import os

import pytest

from tests.integration.conftest import LR_SCHEDULE, LR_SCHEDULE_VALUES, check_ppo_rows, small_config

pytestmark = pytest.mark.integration


def _rows(run_dir: str, name: str) -> list[dict]:
    with open(os.path.join(run_dir, name)) as fh:
        return [json.loads(line) for line in fh]


def test_three_turn_episodes_end_to_end(ray_cluster, tiny_llama, tmp_path):
    from rlhf_ray.coordinator.run import run

    cfg = small_config(tiny_llama, **{"rollout.env": "tests.integration.three_turns:ThreeTurns",
                                      "rollout.max_turns": 3, "rollout.max_model_len": 128,
                                      "rollout.num_engines": 1, "eval.every": 2, "eval.holdout": 4,
                                      "logging.dump_rollouts_every": 1, "learner.zero_stage": 3,
                                      "sync.transport": "collective", "sync.bucket_mb": 0.02, **LR_SCHEDULE})
    summary = run(cfg, str(tmp_path / "run"))
    assert summary["completed"] and summary["iterations"] == 3
    rows = _rows(str(tmp_path / "run"), "metrics.jsonl")
    check_ppo_rows(rows, 16, evaluated=(2,))  # the evaluation after iteration 1 syncs its update
    assert [r["lr"] for r in rows] == pytest.approx(LR_SCHEDULE_VALUES, rel=1e-5)
    assert os.listdir(tmp_path / "run" / "tensorboard")
    assert summary["reward_start"] == pytest.approx(sum(r["reward_mean"] for r in rows) / 3)
    for r in rows:
        assert r["episode/turns_mean"] == 3.0 and r["episode/finish_stop"] == r["samples"] == 16
        assert r["episode/tool_calls_mean"] == 2.0 and 0 < r["episode/observation_token_share"] < 1
        # token in, token out: the learner scores the very tokens each turn sampled, on synced weights
        assert r["logprob_mismatch_max"] < 2e-3, r["logprob_mismatch_max"]
        assert r["onpolicy_ratio_dev"] < 1e-4
        for key in ("policy_loss", "value_loss", "kl_mean", "explained_variance"):
            assert math.isfinite(r[key]), key
    assert rows[1]["kl_k2_mean"] > 1e-6  # the policy moved and the engine followed it
    evals = _rows(str(tmp_path / "run"), "eval.jsonl")
    assert evals and all(e["eval/episode/turns_mean"] == 3.0 for e in evals)
    dumps = sorted(os.listdir(tmp_path / "run" / "rollouts"))
    with open(tmp_path / "run" / "rollouts" / dumps[0]) as fh:
        sample = json.loads(fh.readline())
    assert sample["turns"] == 3 and sample["conversation"][1]["role"] == "observation"
