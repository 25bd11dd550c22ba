"""Offline demo task "multiply with a calculator": data for the tool-use main job.

A prompt asks for the product of two numbers from 10 to 99 (``Q: what is 37 * 48? A:``), which
the tiny model cannot work out in its head. It can call the calculator
(``rlhf_ray.envs.calculator``) and copy the result; an episode reads::

    Q: what is 37 * 48? A:        the prompt
     <calc> 37 * 48</calc>        policy turn 1, ends at the stop string </calc>
     1776.                        the calculator's answer (observation, not trained on in PPO)
     answer 1776                  policy turn 2, then EOS; no call: the episode is done

The operands inside the call are written as in the prompt (`` 37 * 48``) so that each is the same
single token in both places: the policy copies tokens. ``rlhf_ray.rewards:tool_answer_correct``
scores the last ``answer N`` against the record's ``answer`` field (the reward and the gold check).

- ``sft.jsonl``: ``{"prompt", "response"}`` demonstrations of a noisy demonstrator; the response is
  the whole episode after the prompt, observation included. With probability ``direct`` (0.25) it
  answers at once with a wrong guess and no call; with probability ``miscopy`` (0.25) it calls the
  calculator with one digit of one operand mis-copied and answers that (wrong) result; otherwise
  it uses the tool correctly. A model fine-tuned on it has learned the format and is right about
  half of the time: room for PPO.
- ``prompts.jsonl``: PPO's training prompts, ``{"prompt", "answer"}``;
- ``eval_prompts.jsonl``: held-out prompts (same fields) whose number pair, in either order,
  appears in no other file, for the before/after gold accuracy.
"""

from __future__ import annotations

import random
import re

from rlhf_ray.envs.calculator import CLOSE, OPEN, CalculatorEnv, find_calls

LOW, HIGH = 10, 99
TOOL_PROMPT = "Q: what is {a} * {b}? A:"
_PROMPT = re.compile(r"what is (\d+) \* (\d+)\? A:$")
_ANSWER = re.compile(r"\banswer (-?\d+)")
_OPERANDS = re.compile(r"^\s*(\d+)\s*\*\s*(\d+)\s*$")


def prompt_of(a: int, b: int) -> str:
    return TOOL_PROMPT.format(a=a, b=b)


def operands_of(prompt: str) -> tuple[int, int]:
    """(a, b) of a task prompt; a ValueError for a prompt of another form."""
    m = _PROMPT.search(prompt.strip())
    if m is None:
        raise ValueError(f"not a calculator-task prompt: {prompt!r} (expected {TOOL_PROMPT!r})")
    return int(m[1]), int(m[2])


def final_answer(response: str) -> int | None:
    """The number of the last ``answer N`` in an episode's text, None when there is none."""
    found = _ANSWER.findall(response)
    return int(found[-1]) if found else None


def tool_turn(a: int, b: int) -> str:
    """The policy's call, operands written as in the prompt: `` <calc> 37 * 48</calc>``."""
    return f" {OPEN} {a} * {b}{CLOSE}"


def answer_turn(n: int) -> str:
    return f" answer {n}"


def episode_text(turns: list[str]) -> str:
    """The policy's ``turns`` with the calculator's observations between them, as an episode."""
    env, out = CalculatorEnv(), []
    for turn in turns:
        out.append(turn)
        result = env.step(turn)
        if result.done:
            break
        out.append(result.observation)
    return "".join(out)


def outcome(prompt: str, response: str) -> dict[str, bool]:
    """What an episode did: ``called`` the calculator, ``copied`` the prompt's operands exactly in
    its first call, answered ``correct``ly (the product)."""
    a, b = operands_of(prompt)
    calls = find_calls(response)
    m = _OPERANDS.match(calls[0]) if calls else None
    copied = m is not None and (int(m[1]), int(m[2])) == (a, b)
    return {"called": bool(calls), "copied": copied, "correct": final_answer(response) == a * b}


def split_pairs(seed: int, n_eval: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(training pairs, held-out pairs) of ordered (a, b). ``n_eval`` unordered pairs (squares
    included) are held out in both orders; the split depends on ``seed`` only."""
    unordered = [(a, b) for a in range(LOW, HIGH + 1) for b in range(a, HIGH + 1)]
    if not 0 < n_eval < len(unordered):
        raise ValueError(f"n_eval must be in 1..{len(unordered) - 1}, got {n_eval}")
    random.Random(seed).shuffle(unordered)

    def both(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [p for a, b in pairs for p in ([(a, b)] if a == b else [(a, b), (b, a)])]

    return both(unordered[n_eval:]), both(unordered[:n_eval])


def miscopied(x: int, rng: random.Random) -> int:
    """``x`` (two digits) with one digit replaced by another (the first digit never by 0)."""
    digits = list(str(x))
    i = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[i] and not (i == 0 and d == "0")]
    digits[i] = rng.choice(choices)
    return int("".join(digits))


def demonstration(a: int, b: int, rng: random.Random, direct: float, miscopy: float) -> str:
    """One noisy demonstrator's episode for ``a * b`` (see the module docstring)."""
    u = rng.random()
    if u < direct:
        guess = a * b
        while guess == a * b:
            guess = rng.randint(LOW * LOW, HIGH * HIGH)
        return episode_text([answer_turn(guess)])
    if u < direct + miscopy:
        if rng.random() < 0.5:
            a = miscopied(a, rng)
        else:
            b = miscopied(b, rng)
    return episode_text([tool_turn(a, b), answer_turn(a * b)])


def sft_records(pairs: list[tuple[int, int]], n: int, seed: int, direct: float = 0.25,
                miscopy: float = 0.25) -> list[dict]:
    """``n`` demonstrations on pairs drawn (with replacement) from ``pairs``."""
    if not (0 <= direct and 0 <= miscopy and direct + miscopy <= 1):
        raise ValueError(f"direct ({direct}) and miscopy ({miscopy}) must be >= 0 with a sum <= 1")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        out.append({"prompt": prompt_of(a, b), "response": demonstration(a, b, rng, direct, miscopy)})
    return out


def prompt_records(pairs: list[tuple[int, int]], n: int, seed: int) -> list[dict]:
    """``n`` distinct prompts with their ``answer`` (all of ``pairs`` when ``n`` is larger), in a seeded order."""
    chosen = random.Random(seed + 2).sample(pairs, min(n, len(pairs)))
    return [{"prompt": prompt_of(a, b), "answer": a * b} for a, b in chosen]


def task_records(seed: int, n_sft: int, n_prompts: int, n_eval: int) -> dict[str, list[dict]]:
    """The three files' records, keyed by file name; ``n_eval`` held-out unordered pairs."""
    train, held = split_pairs(seed, n_eval)
    return {
        "sft.jsonl": sft_records(train, n_sft, seed),
        "prompts.jsonl": prompt_records(train, n_prompts, seed),
        "eval_prompts.jsonl": prompt_records(held, len(held), seed),
    }
