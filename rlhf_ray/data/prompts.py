"""Prompts for PPO: loading (JSONL, Parquet or a built-in offline generator), tokenising with
the length limit, the pad id, and a deterministic, checkpointable sampling order.

Prompt files are read by the same record reader as the supervised stages' prompt files
(``rlhf_ray.data.records``: ``iter_rows`` and ``prompt_texts``), so errors name the file and
line (JSONL) or record (Parquet) alike. Blank lines hold no prompt; they are counted
(``PromptSet.blank``) and reported by the pre-flight, not dropped unseen.

A record's other fields (``{"prompt": "What is 3*4?", "answer": "12"}``: an expected answer, a
test case) stay with its prompt (``PromptSet.fields``) through every drop and split, and reach
the reward function as keyword arguments, one value per sample (``PromptSet.columns``).

``data.template`` says what a prompt is: plain text, or (chat) a user message or message list
rendered with the tokenizer's chat template. Either way it is tokenised by the rule the SFT and
reward-model data use (``rlhf_ray.data.rm_inputs.prompt_ids``), so the policy and the reward
model see in PPO the prompt ids they were trained on (one BOS, never two).

The sampler walks shuffled epochs over the prompt set; its state is (epoch, position), so a
resumed run draws exactly the batch that would have come next.
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass
from typing import Any

from rlhf_ray.config import DataConfig
from rlhf_ray.data.records import DataError, file_format, iter_rows, prompt_texts
from rlhf_ray.data.rm_inputs import prompt_ids

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


def _read_prompt_texts(cfg: DataConfig, seed: int, tokenizer) -> tuple[list[str], list[dict[str, Any]], int]:
    """(prompt texts, each record's other fields, blank lines skipped) of ``cfg.prompts``, per
    ``cfg.template``."""
    src = cfg.prompts
    blank: list[int] = []
    if src.startswith("builtin:"):
        texts = builtin_prompts(src.split(":", 1)[1], cfg.num_builtin_prompts, seed)
        if cfg.template == "chat":  # each generated prompt is a user turn
            texts = prompt_texts(((f"{src} prompt {i}", {"prompt": t}) for i, t in enumerate(texts)), "prompt",
                                 "chat", tokenizer)
        fields: list[dict[str, Any]] = [{} for _ in texts]
    else:
        if not os.path.isfile(src):
            raise FileNotFoundError(f"prompt file {src!r} does not exist; set --data.prompts to a JSONL file "
                                    "or builtin:digits.")
        # Anything but a Parquet extension is read as JSONL, as before Parquet was accepted.
        rows = list(iter_rows(src, file_format(src, default="jsonl"), blank))
        texts = prompt_texts(rows, cfg.prompt_field, cfg.template, tokenizer)
        fields = [{k: v for k, v in record.items() if k != cfg.prompt_field} for _, record in rows]
    if not texts:
        only = f" (only {len(blank)} blank lines)" if blank else ""
        raise ValueError(f"prompt source {src!r} holds no prompts{only}; point --data.prompts at a JSONL file with "
                         f'one {{"{cfg.prompt_field}": ...}} record per line, or use builtin:digits.')
    return texts, fields, len(blank)


def load_prompt_texts(cfg: DataConfig, seed: int, tokenizer=None) -> list[str]:
    """Prompt strings from ``cfg.prompts`` (a JSONL or Parquet file, or ``builtin:<name>``), as
    text or (``cfg.template`` chat, which needs ``tokenizer``) rendered with the chat template;
    raises a clear error for a missing file, a line that is not JSON, a record without the prompt
    field or whose prompt is not text, or an empty set. Blank lines are skipped; :func:`load_prompts`
    also counts them."""
    return _read_prompt_texts(cfg, seed, tokenizer)[0]


def pad_token_id(tokenizer) -> int:
    """The id used for padding: the tokenizer's pad token, else its EOS (the one rule for PPO
    batches and the supervised trainers' data and score head)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; set pad_token in tokenizer_config.json.")
    return int(pad)


@dataclass
class PromptSet:
    texts: list[str]
    token_ids: list[list[int]]
    dropped: int  # prompts removed for being too long (or empty)
    truncated: int  # prompts cut to max_prompt_tokens
    blank: int = 0  # blank lines of the prompt file, skipped (they hold no record)
    # Each prompt's record without its prompt field, aligned with token_ids ({} for a built-in
    # prompt); an empty list: no prompt has fields.
    fields: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def describe(self) -> str:
        return (f"{len(self.token_ids)} prompts ({self.blank} blank lines skipped, {self.dropped} dropped as too "
                f"long or empty, {self.truncated} truncated)")

    def select(self, indices: list[int]) -> "PromptSet":
        """The prompts at ``indices``, in that order, with their fields; the counts are kept."""
        return dataclasses.replace(self, texts=[self.texts[i] for i in indices],
                                   token_ids=[self.token_ids[i] for i in indices],
                                   fields=[self.fields[i] for i in indices] if self.fields else [])

    def columns(self, indices: list[int]) -> dict[str, list]:
        """The fields of the prompts at ``indices`` as columns, one value per index (a sample's
        prompt index, repeated for each of its samples): name -> values, None where a record lacks
        the field. Every field any record has is a column; ``{}`` when no record has one. E.g.
        fields [{"answer": "12"}, {}] and indices [1, 0, 0] -> {"answer": [None, "12", "12"]}."""
        return {name: [self.fields[i].get(name) for i in indices] for name in self.field_names()}

    def field_names(self) -> list[str]:
        """Every field some record has besides the prompt, in order of first appearance."""
        return list(dict.fromkeys(name for record in self.fields for name in record))


def keep_last_tokens(ids: list[int], max_tokens: int, bos_id: int | None) -> list[int]:
    """The last ``max_tokens`` of ``ids``; a leading BOS stays first (the model was trained with
    one there, and the tokenizer, a chat template or the file put it there) when there is room
    for at least one token after it. E.g. [BOS, a, b, c, d] with 3 -> [BOS, c, d]."""
    if len(ids) <= max_tokens:
        return list(ids)
    if bos_id is not None and ids[0] == bos_id and max_tokens > 1:
        return [ids[0]] + list(ids[len(ids) - (max_tokens - 1):])
    return list(ids[len(ids) - max_tokens:])


def tokenize_prompts(texts: list[str], tokenizer, max_tokens: int, too_long: str, chat: bool = False,
                     fields: list[dict[str, Any]] | None = None) -> PromptSet:
    """Tokenise prompts (``rm_inputs.prompt_ids``: the tokenizer's special tokens for plain text
    that does not already begin with BOS, none for a ``chat`` rendering) and apply the length
    policy (drop / truncate keeping the end and a leading BOS (:func:`keep_last_tokens`) / error).
    ``fields``: each text's record fields, kept with the prompts that stay."""
    assert fields is None or not fields or len(fields) == len(texts), "one fields dict per text"
    bos_id = getattr(tokenizer, "bos_token_id", None)
    kept: list[int] = []
    kept_texts, kept_ids, dropped, truncated = [], [], 0, 0
    for i, text in enumerate(texts):
        ids = prompt_ids(tokenizer, text, chat)
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
            ids = keep_last_tokens(list(ids), max_tokens, bos_id)
            truncated += 1
        kept.append(i)
        kept_texts.append(text)
        kept_ids.append(list(ids))
    if not kept_ids:
        raise ValueError(f"all {len(texts)} prompts were dropped as longer than --data.max_prompt_tokens "
                         f"{max_tokens}; raise the limit or set --data.too_long truncate.")
    return PromptSet(kept_texts, kept_ids, dropped, truncated, fields=[fields[i] for i in kept] if fields else [])


def load_prompts(cfg: DataConfig, tokenizer, seed: int) -> PromptSet:
    """The prompts of ``cfg`` read (:func:`load_prompt_texts`), tokenised under the length policy
    (:func:`tokenize_prompts`, per ``cfg.template``) and counted: blank lines, drops, truncations."""
    texts, fields, blank = _read_prompt_texts(cfg, seed, tokenizer)
    out = tokenize_prompts(texts, tokenizer, cfg.max_prompt_tokens, cfg.too_long, chat=cfg.template == "chat",
                           fields=fields)
    return dataclasses.replace(out, blank=blank)


def split_holdout(prompts: PromptSet, k: int, seed: int) -> tuple[PromptSet, PromptSet]:
    """Hold ``k`` prompts out of ``prompts``: (training set, held-out set), disjoint, each in the
    original order. The held-out subset depends only on ``seed`` and the set's size."""
    n = len(prompts.token_ids)
    if not 0 < k < n:
        raise ValueError(f"cannot hold out {k} of {n} prompts for evaluation; set --eval.holdout between 1 and "
                         f"{n - 1}, or give separate evaluation prompts with --eval.prompts.")
    held = sorted(random.Random(seed * 7919 + 17).sample(range(n), k))
    held_set = set(held)
    train = [i for i in range(n) if i not in held_set]
    return prompts.select(train), dataclasses.replace(prompts.select(held), dropped=0, truncated=0, blank=0)


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
