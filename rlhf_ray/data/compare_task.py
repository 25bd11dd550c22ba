"""Offline demo task "which is larger": data for SFT, the reward model, PPO and a held-out check.

A prompt names two different numbers from 10 to 99 (``Q: which is larger, 47 or 52? A:``); the
right answer is the larger one (`` 52``), checked in code by ``rlhf_ray.rewards.larger_number_correct``
(the gold check). The data imitates how RLHF data is made:

- ``sft.jsonl``: demonstrations from a noisy demonstrator, right with probability ``1 - noise``
  (default 0.7) and otherwise the smaller number, so the fine-tuned model is readable and partly
  right;
- ``preference.jsonl``: pairs in which raters preferred the right answer alone; the rejected
  answer is the smaller number (60%), a number that is in neither place of the prompt (20%), or
  the right number followed by more numbers (20%). The reward model learns from these pairs only,
  never from the gold check;
- ``prompts.jsonl``: PPO's training prompts;
- ``eval_prompts.jsonl``: held-out prompts whose number pair (in either order) appears in none of
  the files above, for the before/after gold accuracy.

Every number appears in training; only the pairs are held out, so what carries over is the
comparison itself. With 4,005 unordered pairs and the default sizes the training files repeat
pairs (sampled with replacement), as demonstrations of a small task would.
"""

from __future__ import annotations

import random

from rlhf_ray.rewards import LARGER_PROMPT

LOW, HIGH = 10, 99


def prompt_of(a: int, b: int) -> str:
    return LARGER_PROMPT.format(a=a, b=b)


def split_pairs(seed: int, n_eval: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(training pairs, held-out pairs) of ordered (a, b), a != b. ``n_eval`` unordered pairs are
    held out (both orders: 2 * n_eval held-out prompts); the split depends on ``seed`` only."""
    unordered = [(a, b) for a in range(LOW, HIGH + 1) for b in range(a + 1, HIGH + 1)]
    if not 0 < n_eval < len(unordered):
        raise ValueError(f"n_eval must be in 1..{len(unordered) - 1}, got {n_eval}")
    random.Random(seed).shuffle(unordered)
    both = [[(a, b), (b, a)] for a, b in unordered]
    held = [p for pair in both[:n_eval] for p in pair]
    train = [p for pair in both[n_eval:] for p in pair]
    return train, held


def sft_records(pairs: list[tuple[int, int]], n: int, seed: int, noise: float = 0.3) -> list[dict]:
    """``n`` demonstrations: the larger number with probability ``1 - noise``, else the smaller."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        answer = min(a, b) if rng.random() < noise else max(a, b)
        out.append({"prompt": prompt_of(a, b), "response": f" {answer}"})
    return out


def preference_records(pairs: list[tuple[int, int]], n: int, seed: int, other: float = 0.2,
                       ramble: float = 0.2) -> list[dict]:
    """``n`` pairs whose chosen answer is the larger number alone. The rejected one is, for a
    fraction ``other``, a number that is neither of the prompt's two; for a fraction ``ramble``,
    the right number followed by one to three more (raters prefer one answer to a list that
    contains it); otherwise the smaller number."""
    rng = random.Random(seed + 1)
    out = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        u = rng.random()
        if u < other:
            rejected = f" {rng.choice([x for x in range(LOW, HIGH + 1) if x not in (a, b)])}"
        elif u < other + ramble:
            rejected = f" {max(a, b)}" + "".join(f" {rng.randint(LOW, HIGH)}" for _ in range(rng.randint(1, 3)))
        else:
            rejected = f" {min(a, b)}"
        out.append({"prompt": prompt_of(a, b), "chosen": f" {max(a, b)}", "rejected": rejected})
    return out


def prompt_records(pairs: list[tuple[int, int]], n: int, seed: int) -> list[dict]:
    """``n`` distinct prompts (all of ``pairs`` when ``n`` is larger), in a seeded order."""
    chosen = random.Random(seed + 2).sample(pairs, min(n, len(pairs)))
    return [{"prompt": prompt_of(a, b)} for a, b in chosen]


def task_records(seed: int, n_sft: int, n_pairs: int, n_prompts: int, n_eval: int) -> dict[str, list[dict]]:
    """The four files' records, keyed by file name; ``n_eval`` held-out unordered pairs."""
    train, held = split_pairs(seed, n_eval)
    return {
        "sft.jsonl": sft_records(train, n_sft, seed),
        "preference.jsonl": preference_records(train, n_pairs, seed),
        "prompts.jsonl": prompt_records(train, n_prompts, seed),
        "eval_prompts.jsonl": prompt_records(held, len(held), seed),
    }
