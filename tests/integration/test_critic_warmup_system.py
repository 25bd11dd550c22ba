"""Critic warm-up and critic epochs on the full system (local Ray, vLLM CPU engine, DeepSpeed ZeRO-2
learner ranks): the warm-up iterations leave the policy where it started (the engines keep the
initial weights, no sync follows them, the KL to the reference stays 0), the first PPO update after
them moves it. (A resume inside the warm-up is checked with in-process roles in
tests/unit/test_critic_tools.py.) The run is tests/integration/conftest.py's ``warmup_run``, which
tests/integration/test_checkpoint_resume.py also resumes after its end: its roles start once.

Run: RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests/integration/test_critic_warmup_system.py
"""

from __future__ import annotations

import math

import pytest

pytestmark = pytest.mark.integration

POLICY_METRICS = ("policy_loss", "clip_fraction", "onpolicy_ratio_dev")


def _check_warmup_rows(rows: list[dict]) -> None:
    """Iterations 0 and 1 warm the critic up, 2 and 3 are PPO iterations with one critic epoch."""
    assert [r["critic_warmup"] for r in rows] == [1.0, 1.0, 0.0, 0.0]
    for r in rows:
        assert math.isfinite(r["value_loss"]) and math.isfinite(r["value_head_grad_norm"])
        assert r["logprob_mismatch_max"] < 2e-3, r["logprob_mismatch_max"]  # the engines run the learner's policy
    for r in rows[:2]:
        assert not set(POLICY_METRICS) & set(r), r
    for r in rows[2:]:
        assert r["onpolicy_ratio_dev"] < 1e-4 and math.isfinite(r["critic_epochs/value_loss"])
    # No sync after a warm-up iteration: iterations 1 and 2 generate with the weights they started
    # with; the first PPO update (iteration 2) is synced before iteration 3.
    assert [("sync_bytes" in r) for r in rows[1:]] == [False, False, True]
    # The policy is the reference until the first update, then moves away from it.
    assert all(r["kl_k2_mean"] < 1e-9 for r in rows[:3]) and rows[3]["kl_k2_mean"] > 1e-6


def test_critic_warmup_and_critic_epochs_end_to_end(warmup_run):
    summary, _, rows = warmup_run
    assert summary["completed"] and summary["iterations"] == 4
    _check_warmup_rows(rows)
