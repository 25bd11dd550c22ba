"""Prompts for PPO: loading (JSONL or a built-in offline generator), tokenising with the
length limit, and a deterministic, checkpointable sampling order.

The sampler walks shuffled epochs over the prompt set; its state is (epoch, position), so a
resumed run draws exactly the batch that would have come next.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass

from rlhf_ray.config import DataConfig

_SUBJECTS = ["the cat", "a farmer", "my friend", "the robot", "a teacher", "the river", "our team"]
_VERBS = ["counts", "sees", "finds", "builds", "needs", "sells", "paints"]
_OBJECTS = ["apples", "stones", "boxes", "birds", "coins", "books", "trees"]


def builtin_prompts(name: str, n: int, seed: int) -> list[str]:
    """Offline generated prompts. ``digits``: short questions whose natural answer is a number."""
    if name != "digits":
        raise ValueError(f"unknown builtin prompt set {name!r}; available: builtin:digits")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rng.randrange(3)
        a, b = rng.randrange(1, 50), rng.randrange(1, 50)
        if kind == 0:
            out.append(f"Q: what is {a} plus {b}? A:")
        elif kind == 1:
            out.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {a} {rng.choice(_OBJECTS)}. How many?")
        else:
            out.append(f"Write the number after {a}:")
    return out


def load_prompt_texts(cfg: DataConfig, seed: int) -> list[str]:
    """Prompt strings from ``cfg.prompts``; raises a clear error for a missing file, a record
    without the prompt field, or an empty set."""
    src = cfg.prompts
    if src.startswith("builtin:"):
        texts = builtin_prompts(src.split(":", 1)[1], cfg.num_builtin_prompts, seed)
    else:
        if not os.path.isfile(src):
            raise FileNotFoundError(f"prompt file {src!r} does not exist; set --data.prompts to a JSONL file "
                                    "or builtin:digits.")
        texts = []
        with open(src) as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{src}:{line_no} is not valid JSON: {exc}") from None
                if not isinstance(record, dict) or cfg.prompt_field not in record:
                    raise ValueError(f"{src}:{line_no} has no field {cfg.prompt_field!r}; set --data.prompt_field "
                                     f"to the field that holds the prompt.")
                value = record[cfg.prompt_field]
                if value is None or isinstance(value, (bool, list, dict)):
                    raise ValueError(f"{src}:{line_no}: field {cfg.prompt_field!r} is {json.dumps(value)}, not text; "
                                     "fix or remove the record.")
                texts.append(str(value))
    if not texts:
        raise ValueError(f"prompt source {src!r} holds no prompts; point --data.prompts at a JSONL file with one "
                         f'{{"{cfg.prompt_field}": ...}} record per line, or use builtin:digits.')
    return texts


@dataclass
class PromptSet:
    texts: list[str]
    token_ids: list[list[int]]
    dropped: int  # prompts removed for being too long
    truncated: int  # prompts cut to max_prompt_tokens


def tokenize_prompts(texts: list[str], tokenizer, max_tokens: int, too_long: str) -> PromptSet:
    """Tokenise prompts and apply the length policy (drop / truncate keeping the end / error)."""
    kept_texts, kept_ids, dropped, truncated = [], [], 0, 0
    for i, text in enumerate(texts):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids:
            dropped += 1
            continue
        if len(ids) > max_tokens:
            if too_long == "error":
                raise ValueError(f"prompt {i} has {len(ids)} tokens, more than --data.max_prompt_tokens "
                                 f"{max_tokens}; raise the limit or set --data.too_long drop/truncate.")
            if too_long == "drop":
                dropped += 1
                continue
            ids = ids[-max_tokens:]
            truncated += 1
        kept_texts.append(text)
        kept_ids.append(list(ids))
    if not kept_ids:
        raise ValueError(f"all {len(texts)} prompts were dropped as longer than --data.max_prompt_tokens "
                         f"{max_tokens}; raise the limit or set --data.too_long truncate.")
    return PromptSet(kept_texts, kept_ids, dropped, truncated)


def split_holdout(prompts: PromptSet, k: int, seed: int) -> tuple[PromptSet, PromptSet]:
    """Hold ``k`` prompts out of ``prompts``: (training set, held-out set), disjoint, each in the
    original order. The held-out subset depends only on ``seed`` and the set's size."""
    n = len(prompts.token_ids)
    if not 0 < k < n:
        raise ValueError(f"cannot hold out {k} of {n} prompts for evaluation; set --eval.holdout between 1 and "
                         f"{n - 1}, or give separate evaluation prompts with --eval.prompts.")
    held = sorted(random.Random(seed * 7919 + 17).sample(range(n), k))
    held_set = set(held)

    def pick(idx: list[int], dropped: int = 0, truncated: int = 0) -> PromptSet:
        return PromptSet([prompts.texts[i] for i in idx], [prompts.token_ids[i] for i in idx], dropped, truncated)

    train = [i for i in range(n) if i not in held_set]
    return pick(train, prompts.dropped, prompts.truncated), pick(held)


class PromptSampler:
    """Deterministic epochs of shuffled indices; ``state_dict`` makes it resumable."""

    def __init__(self, size: int, seed: int, shuffle: bool = True) -> None:
        if size <= 0:
            raise ValueError(f"a prompt sampler needs at least one prompt, got {size}")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed * 100003 + epoch).shuffle(order)
        return order

    def next(self, k: int) -> list[int]:
        """The next ``k`` prompt indices, continuing into the next epoch when one runs out."""
        out: list[int] = []
        while len(out) < k:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
            take = min(k - len(out), self.size - self.position)
            out += self._order(self.epoch)[self.position: self.position + take]
            self.position += take
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "size": self.size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size:
            raise ValueError(f"checkpoint's prompt set had {state['size']} prompts, this one has {self.size}; "
                             "resume with the same data.")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
