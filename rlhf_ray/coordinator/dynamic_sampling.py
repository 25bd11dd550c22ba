"""DAPO's dynamic sampling (``ppo.dynamic_sampling``): keep the prompt groups whose samples got
different scores (a group of equal scores has zero group-relative advantage everywhere),
generating more prompts until the batch holds ``rollout.prompts_per_iteration`` groups.

The coordinator gives the rounds' work as two callables (score a generation, draw and generate
more prompts), so the choice of groups is tested without roles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf_ray.batch import Generation


@dataclass
class VariedGroups:
    gen: Generation  # the kept groups' samples, group ids renumbered 0..P-1
    scores: torch.Tensor  # (B,) their scores
    row_prompts: list[int]  # each sample's prompt (an index into the prompt set)
    extra_prompts: list[int]  # the prompts drawn for the extra rounds, in order
    metrics: dict[str, float]


def varied_groups(gen: Generation, prompts: list[int], wanted: int, max_rounds: int,
                  score: Callable[[Generation, list[int]], torch.Tensor],
                  more: Callable[[], tuple[list[int], Generation]],
                  scores: torch.Tensor | None = None) -> VariedGroups:
    """Groups of ``gen`` (group g answers prompt ``prompts[g]``) with varied scores, and more from
    ``more()`` (new prompts and their generation) for at most ``max_rounds`` rounds, until
    ``wanted`` groups are kept; a batch still short is filled with the dropped groups, in order.
    ``score(gen, prompts)`` scores a round; ``scores``: the first round's, if already known.
    A group with a NaN/inf score counts as not varied."""
    kept: list[tuple[Generation, torch.Tensor, int]] = []  # a group's samples, their scores, its prompt
    dropped: list[tuple[Generation, torch.Tensor, int]] = []
    extra: list[int] = []
    rounds = 0
    while True:
        if scores is None:
            scores = score(gen, prompts)
        for group in dict.fromkeys(gen.prompt_index):  # groups in order of appearance
            rows = [i for i, g in enumerate(gen.prompt_index) if g == group]
            s = scores[rows]
            varied = bool(torch.isfinite(s).all()) and float(s.max() - s.min()) > 0
            (kept if varied else dropped).append((gen.rows(rows), s, prompts[group]))
        if len(kept) >= wanted or rounds >= max_rounds:
            break
        rounds += 1
        prompts, gen = more()
        extra += prompts
        scores = None
    chosen = (kept + dropped)[:wanted]
    for new_id, (g, _, _) in enumerate(chosen):
        g.prompt_index = [new_id] * len(g)
    return VariedGroups(
        gen=Generation.concat([g for g, _, _ in chosen]), scores=torch.cat([s for _, s, _ in chosen]),
        row_prompts=[prompt for g, _, prompt in chosen for _ in range(len(g))], extra_prompts=extra,
        metrics={"dynamic/extra_generations": float(rounds), "dynamic/dropped_groups": float(len(dropped)),
                 "dynamic/filled_groups": float(max(0, wanted - len(kept)))})
