"""How the learner ranks' metrics combine into the group's (``combine_rank_metrics``)."""

from __future__ import annotations

import pytest

from rlhf_ray.workers.learner import combine_rank_metrics


def _rank(policy_loss: float, response_tokens: float, pass_tokens: float, padding: float, seconds: float) -> dict:
    return {"policy_loss": policy_loss, "learner_response_tokens": response_tokens, "learner_tokens": pass_tokens,
            "padding_fraction": padding, "update_seconds": seconds, "grad_norm": 2.5, "onpolicy_ratio_dev": seconds / 10}


def test_per_token_means_weigh_each_rank_by_its_tokens():
    got = combine_rank_metrics([_rank(1.0, 30, 100, 0.1, 3.0), _rank(4.0, 10, 300, 0.5, 5.0)])
    assert got["policy_loss"] == pytest.approx((1.0 * 30 + 4.0 * 10) / 40)  # 1.75, not the plain mean 2.5
    assert got["learner_response_tokens"] == 40 and got["learner_tokens"] == 400  # totals, not means
    assert got["padding_fraction"] == pytest.approx((0.1 * 100 + 0.5 * 300) / 400)  # 0.4
    assert got["update_seconds"] == 5.0 and got["onpolicy_ratio_dev"] == 0.5  # the slowest / largest
    assert got["grad_norm"] == 2.5


def test_one_rank_is_returned_unchanged():
    one = _rank(1.5, 7, 9, 0.2, 1.0)
    assert combine_rank_metrics([one]) == one


def test_ranks_without_tokens_fall_back_to_the_plain_mean():
    got = combine_rank_metrics([_rank(1.0, 0, 0, 0.0, 1.0), _rank(3.0, 0, 0, 0.0, 1.0)])
    assert got["policy_loss"] == 2.0
