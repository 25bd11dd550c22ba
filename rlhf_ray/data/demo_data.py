"""Offline demo data: SFT examples, preference pairs, prompts, for one of two tasks.

    python -m rlhf_ray.data.demo_data --out artifacts/demo_data [--task digits|compare|tools] [--seed 0] [--sft N] ...

``--task compare`` ("which is larger", the main job's task, with a gold check and held-out
prompts) is described in ``rlhf_ray.data.compare_task``; ``--task tools`` ("multiply with a
calculator", the tool-use main job's: SFT demonstrations, prompts with their answers, held-out
prompts; no preference pairs) in ``rlhf_ray.data.tool_task``. ``--task digits`` ("answer in digits",
the default of the one-stage configs) writes three JSONL files into ``--out``, deterministically
for a seed, with no download:

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

TASK_FILES = {"digits": ("sft.jsonl", "preference.jsonl", "prompts.jsonl"),
              "compare": ("sft.jsonl", "preference.jsonl", "prompts.jsonl", "eval_prompts.jsonl"),
              "tools": ("sft.jsonl", "prompts.jsonl", "eval_prompts.jsonl")}
FILES = TASK_FILES["compare"]  # every file name a demo set may have
SIZES = {"digits": {"n_sft": 2000, "n_pairs": 2000, "n_prompts": 512},
         "compare": {"n_sft": 4000, "n_pairs": 8000, "n_prompts": 2048, "n_eval": 200},
         "tools": {"n_sft": 4000, "n_prompts": 2048, "n_eval": 200}}
VERSION = {"digits": 1, "compare": 2, "tools": 1}  # raised when a task's generator changes: ensure_demo_data rewrites
SPEC_FILE = "demo_data.json"  # what was written (task, seed, sizes), written last


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


def write_demo_data(out_dir: str, seed: int = 0, n_sft: int | None = None, n_pairs: int | None = None,
                    n_prompts: int | None = None, task: str = "digits", n_eval: int | None = None) -> dict[str, str]:
    """Write the task's files (``TASK_FILES[task]``) into ``out_dir``; returns their paths. Sizes
    left None take ``SIZES[task]``; ``n_eval`` (held-out unordered pairs) is for ``compare`` and ``tools``; ``n_pairs`` not for ``tools``."""
    if task not in TASK_FILES:
        raise ValueError(f"unknown demo task {task!r}; choose from {', '.join(TASK_FILES)}")
    given = {"n_sft": n_sft, "n_pairs": n_pairs, "n_prompts": n_prompts, "n_eval": n_eval}
    sizes = {k: given[k] if given[k] is not None else v for k, v in SIZES[task].items()}
    if task == "compare":
        from rlhf_ray.data.compare_task import task_records

        records = task_records(seed, **sizes)
    elif task == "tools":
        from rlhf_ray.data.tool_task import task_records as tool_records

        records = tool_records(seed, **sizes)
    else:
        records = {"sft.jsonl": sft_records(sizes["n_sft"], seed),
                   "preference.jsonl": preference_records(sizes["n_pairs"], seed),
                   "prompts.jsonl": prompt_records(sizes["n_prompts"], seed)}
    os.makedirs(out_dir, exist_ok=True)
    spec_path = os.path.join(out_dir, SPEC_FILE)
    if os.path.exists(spec_path):
        os.remove(spec_path)  # the set is incomplete until the spec is back
    paths = {name: os.path.join(out_dir, name) for name in TASK_FILES[task]}
    for name, path in paths.items():
        _write_jsonl(path, records[name])
    _write_jsonl(spec_path, [{"task": task, "version": VERSION[task], "seed": seed, **sizes}])
    return paths


def ensure_demo_data(out_dir: str, seed: int = 0, task: str = "digits") -> dict[str, str]:
    """Write the task's demo files with the default sizes unless ``out_dir`` already holds exactly
    that set (same task and seed, every file present): a directory left by another task is rewritten."""
    paths = {name: os.path.join(out_dir, name) for name in TASK_FILES.get(task, ())}
    spec_path = os.path.join(out_dir, SPEC_FILE)
    if paths and all(os.path.isfile(p) for p in paths.values()) and os.path.isfile(spec_path):
        with open(spec_path) as fh:
            spec = json.loads(fh.readline() or "{}")
        if spec == {"task": task, "version": VERSION[task], "seed": seed, **SIZES[task]}:
            return paths
    return write_demo_data(out_dir, seed, task=task)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_ray.data.demo_data", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--task", choices=sorted(TASK_FILES), default="digits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sft", type=int, help="SFT examples (default: the task's size)")
    parser.add_argument("--pairs", type=int, help="preference pairs")
    parser.add_argument("--prompts", type=int, help="PPO prompts")
    parser.add_argument("--eval-pairs", type=int, help="held-out number pairs (compare, tools; 2 prompts each)")
    args = parser.parse_args(argv)
    paths = write_demo_data(args.out, args.seed, args.sft, args.pairs, args.prompts, args.task, args.eval_pairs)
    for name, path in paths.items():
        with open(path) as fh:
            print(f"{path}: {sum(1 for _ in fh)} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
