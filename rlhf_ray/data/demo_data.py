"""Offline demo data for the "answer in digits" task: SFT examples, preference pairs, prompts.

    python -m rlhf_ray.data.demo_data --out artifacts/demo_data [--seed 0] [--sft 2000] [--pairs 2000] [--prompts 512]

Writes three JSONL files into ``--out``, deterministically for a seed, with no download:

- ``sft.jsonl``: ``{"prompt", "response"}``. The prompts are PPO's own (``builtin_prompts("digits")``:
  sums, counts, "the number after"); each response gives the right answer in one of several
  styles, some in digits (" 42"), some mixed (" It is 42."), some in words (" forty-two
  apples."), so a model fine-tuned on it answers correctly but only partly in digits, and PPO
  has room to raise the digit fraction (``rlhf_ray.rewards.digit_fraction``).
- ``preference.jsonl``: ``{"prompt", "chosen", "rejected"}``: two styles of the same answer,
  where chosen has the strictly higher digit fraction: a reward model learns "digits are better".
- ``prompts.jsonl``: ``{"prompt"}`` for PPO (``--data.prompts``).

What it leaves out: no wrong answers (the preference is about form only), no chat format.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
from typing import Callable

from rlhf_ray.data.prompts import builtin_prompts
from rlhf_ray.rewards import digit_fraction

_ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
_TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]

FILES = ("sft.jsonl", "preference.jsonl", "prompts.jsonl")


def number_words(n: int) -> str:
    """English words for 0 <= n < 1000, e.g. 42 -> "forty-two", 105 -> "one hundred five"."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_words(rest))


_PATTERNS: list[tuple[re.Pattern, Callable[[re.Match], tuple[int, str | None]]]] = [
    (re.compile(r"what is (\d+) plus (\d+)\? A:$"), lambda m: (int(m[1]) + int(m[2]), None)),
    (re.compile(r" (\d+) (\w+)\. How many\?$"), lambda m: (int(m[1]), m[2])),
    (re.compile(r"Write the number after (\d+):$"), lambda m: (int(m[1]) + 1, None)),
]


def answer_of(prompt: str) -> tuple[int, str | None]:
    """(the number that answers a builtin "digits" prompt, the counted object or None)."""
    for pattern, answer in _PATTERNS:
        m = pattern.search(prompt)
        if m:
            return answer(m)
    raise ValueError(f"not a builtin digits prompt: {prompt!r}")


def response_styles(n: int, obj: str | None) -> list[str]:
    """Ways to answer n, from all digits to all words. Each starts with a space: prompts end
    with "A:", "?" or ":" and byte-level BPE keeps the space with the next word."""
    w = number_words(n)
    styles = [f" {n}", f" {n}.", f" It is {n}.", f" The answer is {n}.", f" {w}", f" It is {w}.",
              f" The answer is {w}."]
    if obj:
        styles += [f" {n} {obj}.", f" {w} {obj}."]
    return styles


def sft_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for prompt in builtin_prompts("digits", n, seed + 1):
        out.append({"prompt": prompt, "response": rng.choice(response_styles(*answer_of(prompt)))})
    return out


def preference_records(n: int, seed: int) -> list[dict]:
    """Pairs of two styles whose digit fractions differ; chosen has the higher one."""
    rng = random.Random(seed + 2)
    out = []
    for prompt in builtin_prompts("digits", n, seed + 3):
        styles = response_styles(*answer_of(prompt))
        while True:
            a, b = rng.sample(styles, 2)
            fa, fb = digit_fraction([prompt] * 2, [a, b])
            if fa != fb:
                break
        chosen, rejected = (a, b) if fa > fb else (b, a)
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def prompt_records(n: int, seed: int) -> list[dict]:
    return [{"prompt": p} for p in builtin_prompts("digits", n, seed + 4)]


def _write_jsonl(path: str, records: list[dict]) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    os.replace(tmp, path)  # a reader never sees a half-written file


def write_demo_data(out_dir: str, seed: int = 0, n_sft: int = 2000, n_pairs: int = 2000,
                    n_prompts: int = 512) -> dict[str, str]:
    """Write sft.jsonl, preference.jsonl and prompts.jsonl into ``out_dir``; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in FILES}
    _write_jsonl(paths["sft.jsonl"], sft_records(n_sft, seed))
    _write_jsonl(paths["preference.jsonl"], preference_records(n_pairs, seed))
    _write_jsonl(paths["prompts.jsonl"], prompt_records(n_prompts, seed))
    return paths


def ensure_demo_data(out_dir: str, seed: int = 0) -> dict[str, str]:
    """Write the demo files only if one of them is missing (``--data.demo true``)."""
    paths = {name: os.path.join(out_dir, name) for name in FILES}
    if all(os.path.isfile(p) for p in paths.values()):
        return paths
    return write_demo_data(out_dir, seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.data.demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", type=int, default=2000, help="SFT examples")
    parser.add_argument("--pairs", type=int, default=2000, help="preference pairs")
    parser.add_argument("--prompts", type=int, default=512, help="PPO prompts")
    args = parser.parse_args(argv)
    paths = write_demo_data(args.out, args.seed, args.sft, args.pairs, args.prompts)
    for name, path in paths.items():
        with open(path) as fh:
            print(f"{path}: {sum(1 for _ in fh)} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
