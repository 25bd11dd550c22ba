"""Typed batches that travel between roles.

Vocabulary: ``B`` sequences, ``P`` prompt tokens (prompts left-padded to a common length),
``R`` response tokens (responses right-padded). Masks are bool and True means "counts".

* :class:`Generation` is what the rollout engines return: ragged Python lists.
* :class:`ExperienceBatch` is the packed, padded tensor form every other role works on. The
  coordinator fills its optional fields as the phases run (reference logprobs, scores, old
  logprobs and values, advantages, returns) and slices it per learner rank.

Only the standard library and torch are imported here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch


@dataclass
class Generation:
    """Responses from the rollout engines, one entry per sample (prompts repeated n times)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]  # sampled-token logprobs under the engine's weights, at temperature
    finish_reasons: list[str]  # "stop" (EOS / stop token) or "length" (cut off)
    prompt_index: list[int]  # index of the prompt in the iteration's prompt list (the group id)

    def __len__(self) -> int:
        return len(self.response_ids)

    @staticmethod
    def concat(parts: Sequence["Generation"]) -> "Generation":
        out = Generation([], [], [], [], [])
        for part in parts:
            for f in dataclasses.fields(Generation):
                getattr(out, f.name).extend(getattr(part, f.name))
        return out


@dataclass
class ExperienceBatch:
    """Packed experience. Required fields come from packing a Generation; the rest are
    filled by later phases (None until then). Every tensor has leading dimension B."""

    input_ids: torch.Tensor  # (B, P+R) long: left-padded prompt then right-padded response
    attention_mask: torch.Tensor  # (B, P+R) bool
    position_ids: torch.Tensor  # (B, P+R) long, counting real tokens only
    response_mask: torch.Tensor  # (B, R) bool
    rollout_logprobs: torch.Tensor  # (B, R) float32, from the engine
    truncated: torch.Tensor  # (B,) bool: cut off at max_new_tokens without EOS
    prompt_index: torch.Tensor  # (B,) long
    ref_logprobs: torch.Tensor | None = None  # (B, R) float32
    scores: torch.Tensor | None = None  # (B,) float32, reward before shaping
    old_logprobs: torch.Tensor | None = None  # (B, R) float32, learner at rollout weights
    old_values: torch.Tensor | None = None  # (B, R) float32
    advantages: torch.Tensor | None = None  # (B, R) float32
    returns: torch.Tensor | None = None  # (B, R) float32
    meta: dict = field(default_factory=dict)  # small per-batch facts (e.g. tokens of the step)

    # ------------------------------------------------------------------ shape helpers
    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def prompt_len(self) -> int:
        return int(self.input_ids.shape[1] - self.response_mask.shape[1])

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, R) long."""
        return self.input_ids[:, self.prompt_len:]

    def num_response_tokens(self) -> int:
        return int(self.response_mask.sum())

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self)
                if f.name != "meta" and getattr(self, f.name) is not None]

    # ------------------------------------------------------------------ transforms
    def replace(self, **changes) -> "ExperienceBatch":
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> "ExperienceBatch":
        """Every tensor moved to ``device`` (no copy when already there)."""
        return self.replace(**{n: getattr(self, n).to(device) for n in self._tensor_fields()}, meta=dict(self.meta))

    def select(self, index: torch.Tensor | slice) -> "ExperienceBatch":
        """Rows ``index`` of every tensor (a new batch; tensors are not copied for slices)."""
        return self.replace(**{n: getattr(self, n)[index] for n in self._tensor_fields()},
                            meta=dict(self.meta))

    def split(self, parts: int) -> list["ExperienceBatch"]:
        """``parts`` contiguous equal shards; raises if B is not divisible by ``parts``."""
        if len(self) % parts:
            raise ValueError(f"cannot split a batch of {len(self)} into {parts} equal parts")
        size = len(self) // parts
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def chunks(self, size: int) -> list["ExperienceBatch"]:
        """Consecutive chunks of at most ``size`` rows."""
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    @staticmethod
    def concat(parts: Sequence["ExperienceBatch"]) -> "ExperienceBatch":
        """Rows of ``parts`` stacked in order; they must share P and R."""
        first = parts[0]
        shapes = {(p.prompt_len, p.response_mask.shape[1]) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot concat batches with different (P, R): {sorted(shapes)}")
        names = first._tensor_fields()
        return first.replace(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names},
                             meta=dict(first.meta))

    def trim(self) -> "ExperienceBatch":
        """Drop all-padding prompt columns on the left and response columns on the right."""
        keep_r = int(self.response_mask.any(0).nonzero().max()) + 1 if self.response_mask.any() else 1
        prompt_mask = self.attention_mask[:, : self.prompt_len]
        first_p = int(prompt_mask.any(0).nonzero().min()) if prompt_mask.any() else self.prompt_len
        cols = slice(first_p, self.prompt_len + keep_r)
        out = {n: getattr(self, n) for n in self._tensor_fields()}
        for n in ("input_ids", "attention_mask", "position_ids"):
            out[n] = out[n][:, cols]
        for n, t in out.items():
            if n not in ("input_ids", "attention_mask", "position_ids") and t.dim() == 2:
                out[n] = t[:, :keep_r]
        return self.replace(**out, meta=dict(self.meta))


def pack_generation(gen: Generation, pad_id: int, eos_ids: Sequence[int] = ()) -> ExperienceBatch:
    """Pad a Generation into tensors: prompts left-padded to P, responses right-padded to R.

    A response is ``truncated`` when its finish reason is "length" and it does not end in
    one of ``eos_ids`` (a response that ends exactly at the limit with EOS is complete).
    """
    if len(gen) == 0:
        raise ValueError("cannot pack an empty generation")
    lengths = {f.name: len(getattr(gen, f.name)) for f in dataclasses.fields(Generation)}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"a Generation needs one entry per sample in every list, got {lengths}")
    B = len(gen)
    P = max(len(p) for p in gen.prompt_ids)
    R = max(1, max(len(r) for r in gen.response_ids))
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + R), dtype=torch.bool)
    logprobs = torch.zeros((B, R), dtype=torch.float32)
    eos = set(eos_ids)
    truncated = torch.zeros(B, dtype=torch.bool)
    for i, (p, r, lp) in enumerate(zip(gen.prompt_ids, gen.response_ids, gen.logprobs)):
        if len(lp) != len(r):
            raise ValueError(f"sample {i}: {len(r)} response tokens but {len(lp)} logprobs")
        input_ids[i, P - len(p): P] = torch.tensor(p, dtype=torch.long)
        attention[i, P - len(p): P] = True
        if r:
            input_ids[i, P: P + len(r)] = torch.tensor(r, dtype=torch.long)
            attention[i, P: P + len(r)] = True
            logprobs[i, : len(r)] = torch.tensor(lp, dtype=torch.float32)
        truncated[i] = gen.finish_reasons[i] == "length" and not (r and r[-1] in eos)
    position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
    return ExperienceBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        response_mask=attention[:, P:].clone(),
        rollout_logprobs=logprobs,
        truncated=truncated,
        prompt_index=torch.tensor(gen.prompt_index, dtype=torch.long),
    )
