"""Dynamic sampling's choice of groups, by hand (coordinator/dynamic_sampling.py)."""

import math

import torch

from rlhf_ray.batch import Generation
from rlhf_ray.coordinator.dynamic_sampling import varied_groups


def _gen(groups: int, n: int = 2, tag: int = 0) -> Generation:
    """``groups`` prompts x ``n`` samples; sample j of group g answers with the one token 100*tag + 10*g + j."""
    rows = [(g, j) for g in range(groups) for j in range(n)]
    return Generation([[1]] * len(rows), [[100 * tag + 10 * g + j] for g, j in rows], [[0.0]] * len(rows),
                      ["stop"] * len(rows), [g for g, _ in rows])


def test_keeps_varied_groups_draws_more_and_fills_with_dropped_ones_in_order():
    # round 0: prompts 7, 8, 9; group 0 varied, group 1 equal, group 2 has a NaN (not varied)
    # round 1: prompts 4, 5, 6; group 0 equal, group 1 varied, group 2 equal: 2 kept of the 3 wanted
    rounds = {0: torch.tensor([1.0, 0.0, 0.5, 0.5, math.nan, 1.0]), 1: torch.tensor([2.0, 2.0, 0.0, 3.0, 1.0, 1.0])}
    calls = []

    def score(gen, prompts):
        calls.append(list(prompts))
        return rounds[len(calls) - 1]

    def more():
        return [4, 5, 6], _gen(3, tag=1)

    out = varied_groups(_gen(3), [7, 8, 9], wanted=3, max_rounds=1, score=score, more=more)
    # kept: (round 0, group 0: prompt 7), (round 1, group 1: prompt 5); then dropped ones in order:
    # round 0 group 1 (prompt 8) fills the third place
    assert out.row_prompts == [7, 7, 5, 5, 8, 8]
    assert [r[0] for r in out.gen.response_ids] == [0, 1, 110, 111, 10, 11]
    assert out.gen.prompt_index == [0, 0, 1, 1, 2, 2]
    assert out.scores.tolist() == [1.0, 0.0, 0.0, 3.0, 0.5, 0.5]
    assert out.extra_prompts == [4, 5, 6] and calls == [[7, 8, 9], [4, 5, 6]]
    assert out.metrics == {"dynamic/extra_generations": 1.0, "dynamic/dropped_groups": 4.0,
                           "dynamic/filled_groups": 1.0}


def test_known_first_scores_are_not_asked_again_and_enough_groups_stop_at_once():
    def score(gen, prompts):
        raise AssertionError("the first round's scores were given")

    out = varied_groups(_gen(2), [3, 4], wanted=2, max_rounds=4, score=score, more=None,
                        scores=torch.tensor([0.0, 1.0, 2.0, 1.0]))
    assert out.row_prompts == [3, 3, 4, 4] and out.extra_prompts == []
    assert out.metrics["dynamic/extra_generations"] == 0.0
