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
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass
class Generation:
    """Responses from the rollout engines, one entry per sample (prompts repeated n times).

    A multi-turn episode (``rollout.env``) is one sample whose response holds every turn and every
    observation after the prompt, in order, as token ids; the three episode lists say which tokens
    the policy sampled, where the environment's rewards land, and how the episode went. They are
    None for single responses (every response token is the policy's)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    logprobs: list[list[float]]  # sampled-token logprobs under the engine's weights, at temperature (0 at observations)
    finish_reasons: list[str]  # "stop" (EOS / stop token; an episode: the environment's done) or "length" (cut off);
    # an episode may also end with "max_turns", "max_episode_tokens", "env_error" or "env_timeout"
    prompt_index: list[int]  # index of the prompt in the iteration's prompt list (the group id)
    action_masks: list[list[bool]] | None = None  # episodes: per response token, True = sampled by the policy
    turn_rewards: list[list[float]] | None = None  # episodes: the environment's reward on each turn's last token
    episodes: list[dict] | None = None  # episodes: turns, tool_calls, tool_errors, observation_tokens
    versions: list[list[int]] | None = None  # per response token: the policy version of the weights that sampled
    # it (an observation: its turn's); set by the coordinator, which knows which version the engines hold

    def __len__(self) -> int:
        return len(self.response_ids)

    def rows(self, indices: Sequence[int]) -> "Generation":
        """The samples at ``indices``, in that order."""
        return Generation(**{f.name: None if getattr(self, f.name) is None else [getattr(self, f.name)[i] for i in indices]
                             for f in dataclasses.fields(Generation)})

    @staticmethod
    def concat(parts: Sequence["Generation"]) -> "Generation":
        """Samples of ``parts`` in order; the optional lists are kept when every part has them."""
        out = Generation(*([] for _ in dataclasses.fields(Generation)))
        for f in dataclasses.fields(Generation):
            values = [getattr(part, f.name) for part in parts]
            if any(v is None for v in values):
                if not all(v is None for v in values):
                    raise ValueError(f"cannot concat parts with and without {f.name}")
                setattr(out, f.name, None)
            else:
                for v in values:
                    getattr(out, f.name).extend(v)
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
    bad_rows: torch.Tensor | None = None  # (B,) bool: quarantined samples (NaN/inf score, logprob or value)
    # Episodes (rollout.env) only; None: every response token is the policy's.
    action_mask: torch.Tensor | None = None  # (B, R) bool: tokens the policy sampled (the loss mask); within response_mask
    turn_rewards: torch.Tensor | None = None  # (B, R) float32: the environment's rewards, on each turn's last token

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

    @property
    def actions(self) -> torch.Tensor:
        """(B, R) bool: the tokens the policy sampled, which alone get the policy loss, the
        entropy, the KL and the logprob checks. ``response_mask`` says which tokens are real (the
        model reads them and computes their logprobs); in an episode the observations are real
        but not actions. Single responses: the response mask itself."""
        return self.response_mask if self.action_mask is None else self.action_mask

    def _tensor_fields(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is not None]

    # ------------------------------------------------------------------ transforms
    def replace(self, **changes) -> "ExperienceBatch":
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str) -> "ExperienceBatch":
        """Every tensor moved to ``device`` (no copy when already there)."""
        return self.replace(**{n: getattr(self, n).to(device) for n in self._tensor_fields()})

    def select(self, index: torch.Tensor | slice) -> "ExperienceBatch":
        """Rows ``index`` of every tensor (a new batch; tensors are not copied for slices)."""
        return self.replace(**{n: getattr(self, n)[index] for n in self._tensor_fields()})

    def split(self, parts: int) -> list["ExperienceBatch"]:
        """``parts`` contiguous equal shards; raises if B is not divisible by ``parts``."""
        if len(self) % parts:
            raise ValueError(f"cannot split a batch of {len(self)} into {parts} equal parts")
        size = len(self) // parts
        return [self.select(slice(i * size, (i + 1) * size)) for i in range(parts)]

    def chunks(self, size: int) -> list["ExperienceBatch"]:
        """Consecutive chunks of at most ``size`` rows (views; :func:`plan_passes` by rows)."""
        return [self.select(slice(rows[0], rows[-1] + 1)) for rows in plan_passes(len(self), max_rows=size)]

    @staticmethod
    def concat(parts: Sequence["ExperienceBatch"]) -> "ExperienceBatch":
        """Rows of ``parts`` stacked in order; they must share P and R."""
        first = parts[0]
        shapes = {(p.prompt_len, p.response_mask.shape[1]) for p in parts}
        if len(shapes) != 1:
            raise ValueError(f"cannot concat batches with different (P, R): {sorted(shapes)}")
        names = first._tensor_fields()
        return first.replace(**{n: torch.cat([getattr(p, n) for p in parts]) for n in names})

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
        return self.replace(**out)


@dataclass
class TrainUpdate:
    """What a learner rank needs for its update beyond the slice it already holds from
    ``compute_old`` (token ids, masks, the engines' logprobs, its own old logprobs and values):
    only what the score and advantages phases produced. Shapes match that slice: (B, R)."""

    advantages: torch.Tensor  # (B, R) float32; 0 outside response_mask
    returns: torch.Tensor  # (B, R) float32 value targets (zeros for critic-free estimators)
    response_mask: torch.Tensor  # (B, R) bool: the slice's mask with quarantined samples cleared
    ref_logprobs: torch.Tensor | None = None  # (B, R) float32, only with the KL penalty in the loss
    kl_coef: float = 0.0  # weight of the KL loss term (ppo.kl_in loss)
    value_only: bool = False  # a critic warm-up iteration: the value trains alone, the policy stays as it is

    @staticmethod
    def of(batch: ExperienceBatch, with_ref: bool = False, kl_coef: float = 0.0,
           value_only: bool = False) -> "TrainUpdate":
        return TrainUpdate(batch.advantages, batch.returns, batch.response_mask,
                           batch.ref_logprobs if with_ref else None, kl_coef, value_only)

    def split(self, parts: int) -> list["TrainUpdate"]:
        """``parts`` contiguous equal shards, matching ``ExperienceBatch.split``."""
        B = self.advantages.shape[0]
        if B % parts:
            raise ValueError(f"cannot split an update of {B} rows into {parts} equal parts")
        size = B // parts

        def rows(t: torch.Tensor | None, i: int) -> torch.Tensor | None:
            return None if t is None else t[i * size:(i + 1) * size]

        return [TrainUpdate(rows(self.advantages, i), rows(self.returns, i), rows(self.response_mask, i),
                            rows(self.ref_logprobs, i), self.kl_coef, self.value_only) for i in range(parts)]

    def apply_to(self, shard: ExperienceBatch) -> ExperienceBatch:
        """``shard`` (with old logprobs and values) ready for the update: the new fields set, and
        old logprobs/values zeroed outside the mask (a quarantined sample's may be NaN, and a
        masked NaN would still poison a sum)."""
        if shard.old_logprobs is None or shard.old_values is None:
            raise ValueError("the shard has no old logprobs/values; compute_old must run before train")
        if self.advantages.shape != shard.response_mask.shape:
            raise ValueError(f"an update of shape {tuple(self.advantages.shape)} does not match the shard of "
                             f"shape {tuple(shard.response_mask.shape)} kept from compute_old")
        mask = self.response_mask
        zero = torch.zeros((), dtype=torch.float32)
        ref = None if self.ref_logprobs is None else torch.where(mask, self.ref_logprobs, zero)
        return shard.replace(advantages=self.advantages, returns=self.returns, response_mask=mask,
                             old_logprobs=torch.where(mask, shard.old_logprobs, zero),
                             old_values=torch.where(mask, shard.old_values, zero), ref_logprobs=ref)


def pack_generation(gen: Generation, pad_id: int, eos_ids: Sequence[int] = ()) -> ExperienceBatch:
    """Pad a Generation into tensors: prompts left-padded to P, responses right-padded to R.

    A response is ``truncated`` when its finish reason is one of :data:`CUT_OFF` and it does not
    end in one of ``eos_ids`` (a response that ends exactly at the limit with EOS is complete). An
    episode's action flags and turn rewards become ``action_mask`` and ``turn_rewards``.
    """
    if len(gen) == 0:
        raise ValueError("cannot pack an empty generation")
    lengths = {f.name: len(getattr(gen, f.name)) for f in dataclasses.fields(Generation) if getattr(gen, f.name) is not None}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"a Generation needs one entry per sample in every list, got {lengths}")
    B = len(gen)
    P = max(len(p) for p in gen.prompt_ids)
    R = max(1, max(len(r) for r in gen.response_ids))
    input_ids = torch.full((B, P + R), pad_id, dtype=torch.long)
    attention = torch.zeros((B, P + R), dtype=torch.bool)
    logprobs = torch.zeros((B, R), dtype=torch.float32)
    episodes = gen.action_masks is not None
    actions = torch.zeros((B, R), dtype=torch.bool) if episodes else None
    turn_rewards = torch.zeros((B, R), dtype=torch.float32) if episodes else None
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
        if episodes:
            acts, rewards = gen.action_masks[i], gen.turn_rewards[i]
            if len(acts) != len(r) or len(rewards) != len(r):
                raise ValueError(f"episode {i}: {len(r)} response tokens but {len(acts)} action flags and "
                                 f"{len(rewards)} turn rewards")
            if r:
                actions[i, : len(r)] = torch.tensor(acts, dtype=torch.bool)
                turn_rewards[i, : len(r)] = torch.tensor(rewards, dtype=torch.float32)
        truncated[i] = gen.finish_reasons[i] in CUT_OFF and not (r and r[-1] in eos)
    position_ids = (attention.long().cumsum(-1) - 1).clamp(min=0)
    return ExperienceBatch(
        input_ids=input_ids,
        attention_mask=attention,
        position_ids=position_ids,
        response_mask=attention[:, P:].clone(),
        rollout_logprobs=logprobs,
        truncated=truncated,
        prompt_index=torch.tensor(gen.prompt_index, dtype=torch.long),
        action_mask=actions,
        turn_rewards=turn_rewards,
    )


CUT_OFF = ("length", "max_turns", "max_episode_tokens")
"""Finish reasons of a sample that was cut off (``truncated`` unless it ends in EOS): a response at
its token limit, an episode at its turn or token limit."""


def decode_rows(batch: ExperienceBatch, tokenizer) -> tuple[list[str], list[str]]:
    """Prompt and response texts of each row, padding and special tokens removed (``tokenizer``:
    anything with a transformers-style ``decode``)."""
    P = batch.prompt_len
    prompts, responses = [], []
    for ids, mask in zip(batch.input_ids, batch.attention_mask):
        prompts.append(tokenizer.decode(ids[:P][mask[:P]].tolist(), skip_special_tokens=True))
        responses.append(tokenizer.decode(ids[P:][mask[P:]].tolist(), skip_special_tokens=True))
    return prompts, responses


def conversations(batch: ExperienceBatch, tokenizer) -> list[list[dict]]:
    """Each row's response as turns: ``{"role": "policy" | "observation", "text": ...}``, one entry per
    run of the policy's tokens (trained) or an environment's (context only), decoded without special
    tokens. A single response is one policy entry."""
    P = batch.prompt_len
    out = []
    for ids, real, acts in zip(batch.input_ids[:, P:], batch.attention_mask[:, P:], batch.actions):
        turns: list[dict] = []
        flags = acts[real].tolist() if batch.action_mask is not None else [True] * int(real.sum())
        for token, policy in zip(ids[real].tolist(), flags):
            role = "policy" if policy else "observation"
            if not turns or turns[-1]["role"] != role:
                turns.append({"role": role, "ids": []})
            turns[-1]["ids"].append(token)
        out.append([{"role": t["role"], "text": tokenizer.decode(t["ids"], skip_special_tokens=True)} for t in turns])
    return out


def marked_text(turns: list[dict]) -> str:
    """A conversation of :func:`conversations` as one text, each observation in ``[[ ]]``: what the
    policy was trained on is everything outside the brackets."""
    return "".join(t["text"] if t["role"] == "policy" else f"[[{t['text']}]]" for t in turns)


# --------------------------------------------------------------------------- padding-free packing


@dataclass
class PackedRows:
    """The real tokens of a padded batch laid end to end in a few rows, with (almost) no padding.

    ``N`` is the number of response tokens (``response_mask.sum()``); the batch becomes ``K``
    rows of ``L`` tokens. A model given ``input_ids`` and ``position_ids`` with no attention
    mask sees one sequence per run of positions that counts up from 0 (transformers derives a
    block-diagonal causal mask from the restarts), so each sequence attends to itself only, as
    in the padded batch. A row shorter than ``L`` ends in a filler run (token 0, positions from
    0) that attends only to itself and whose outputs are never read.

    Why rows and not one row: SDPA and eager attention build the block-diagonal mask as a
    dense (L x L) matrix and score every query against every key in the row, so one row of the
    whole micro-batch costs O(T^2) attention (16 sequences of 1k tokens in one 16k row: 16x the
    padded batch's attention, ~13x slower updates measured on CPU). Rows no longer than the
    longest sequence keep the attention cost at most the padded batch's while the linear layers
    (most of the FLOPs) still skip the padding.
    """

    input_ids: torch.Tensor  # (K, L) long
    position_ids: torch.Tensor  # (K, L) long, restarting at 0 for each sequence
    keep_index: torch.Tensor  # (N,) long: index into the flattened (K*L) positions predicting each response token

    @property
    def num_tokens(self) -> int:
        """Tokens through the model, filler included (K * L)."""
        return int(self.input_ids.numel())


def pack_rows(batch: ExperienceBatch, row_tokens: int | None = None) -> PackedRows:
    """Pack ``batch`` (left-padded prompts, right-padded responses) into rows of at most
    ``row_tokens`` tokens (None: the longest sequence's length; a longer sequence gets a row of
    its own), placing the longest sequences first, each into the first row it fits (first-fit
    decreasing).

    Response token ``j`` of sequence ``i``, placed in row ``k`` at column ``c_i``, is predicted at
    flat position ``k * L + c_i + prompt_len_i - 1 + j``; ``keep_index`` lists these in row-major
    order of ``response_mask``, so a (B, R) tensor ``t`` matches the packed outputs as
    ``t[response_mask]``. E.g. prompts [5, 6] and [7], responses [8] and [9, 10] (3 tokens each):
    by default two rows, input_ids [[5, 6, 8], [7, 9, 10]], position_ids [[0, 1, 2], [0, 1, 2]],
    keep_index [1, 3, 4] (row 1 starts at flat position 3); with ``row_tokens=6`` one row,
    input_ids [[5, 6, 8, 7, 9, 10]], position_ids [[0, 1, 2, 0, 1, 2]], the same keep_index.
    """
    mask = batch.attention_mask
    P = batch.prompt_len
    prompt_lens = mask[:, :P].sum(-1)
    if bool((prompt_lens == 0).any()):
        raise ValueError("every sequence needs at least one prompt token (it predicts the first response token)")
    lengths = mask.sum(-1)
    cap = int(lengths.max()) if row_tokens is None else max(int(row_tokens), int(lengths.max()))
    fill: list[int] = []  # tokens placed in each row so far
    row_of, col_of = [0] * len(lengths), [0] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda k: (-int(lengths[k]), k)):
        n = int(lengths[i])
        k = next((r for r, f in enumerate(fill) if f + n <= cap), len(fill))
        if k == len(fill):
            fill.append(0)
        row_of[i], col_of[i] = k, fill[k]
        fill[k] += n
    K, L = len(fill), max(fill)
    dev = mask.device
    start = torch.tensor(row_of, device=dev) * L + torch.tensor(col_of, device=dev)  # (B,) flat position of each sequence's first token
    rank = mask.long().cumsum(-1) - 1  # (B, T): index of each real token within its sequence
    dest = (start.unsqueeze(-1) + rank)[mask]  # flat position of each real token, row-major
    input_ids = torch.zeros(K * L, dtype=batch.input_ids.dtype, device=dev)
    input_ids[dest] = batch.input_ids[mask]
    # Filler positions count up from 0 after each row's last sequence; real ones are overwritten.
    position_ids = (torch.arange(L, device=dev) - torch.tensor(fill, device=dev).unsqueeze(-1)).clamp(min=0).reshape(-1)
    position_ids[dest] = batch.position_ids[mask].to(position_ids.dtype)
    R = batch.response_mask.shape[1]
    index = (start + prompt_lens - 1).unsqueeze(-1) + torch.arange(R, device=dev)
    return PackedRows(input_ids=input_ids.view(K, L), position_ids=position_ids.view(K, L),
                      keep_index=index[batch.response_mask])


def token_balanced_parts(lengths: Sequence[int], parts: int) -> list[list[int]]:
    """Indices of ``lengths`` split into ``parts`` non-empty groups of similar token sums.

    Longest first, each into the group with the fewest tokens so far (ties: the lower group);
    indices within a group are ascending. E.g. lengths [5, 1, 4, 2], 2 parts -> [[0, 1], [2, 3]]
    (6 and 6 tokens). Needs ``1 <= parts <= len(lengths)``.
    """
    if not 1 <= parts <= len(lengths):
        raise ValueError(f"cannot split {len(lengths)} sequences into {parts} non-empty parts")
    groups: list[list[int]] = [[] for _ in range(parts)]
    sums = [0] * parts
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        g = min(range(parts), key=lambda k: (sums[k], k))
        groups[g].append(i)
        sums[g] += lengths[i]
    return [sorted(g) for g in groups]


def join_rows(parts: Sequence[Sequence[int]], values: Sequence[torch.Tensor]) -> torch.Tensor:
    """The rows of ``values`` put back in batch order: ``values[k]`` holds, in order, the rows
    ``parts[k]`` of a batch of B rows (e.g. what each replica computed over its part from
    :func:`token_balanced_parts`); the parts together hold each of 0..B-1 once. Returns (B, ...).
    E.g. parts [[1], [0, 2]] with values [[10], [20, 30]] -> [20, 10, 30]."""
    order = [i for part in parts for i in part]
    if sorted(order) != list(range(len(order))):
        raise ValueError(f"the parts must hold the rows 0..{len(order) - 1} (as many as they hold in all) each once, "
                         f"got {[list(p) for p in parts]}: a row would be lost or taken twice")
    for part, value in zip(parts, values, strict=True):
        if value.shape[0] != len(part):
            raise ValueError(f"a part of {len(part)} rows came back with {value.shape[0]}")
    stacked = torch.cat(list(values))
    out = torch.empty_like(stacked)
    out[torch.tensor(order, dtype=torch.long)] = stacked
    return out


def parts_for_budget(lengths: Sequence[int], max_tokens: int) -> int:
    """The fewest parts for which :func:`token_balanced_parts` keeps every part within
    ``max_tokens`` tokens (a sequence longer than the budget gets a part to itself).
    E.g. lengths [5, 1, 4, 2] with a budget of 6 -> 2; with a budget of 5 -> 3."""
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    # A lower bound: each over-budget sequence alone, the others at most max_tokens per part.
    over = sum(1 for n in lengths if n > max_tokens)
    parts = max(1, over + -(-sum(n for n in lengths if n <= max_tokens) // max_tokens))
    while parts < len(lengths):
        groups = token_balanced_parts(lengths, parts)
        if all(len(g) == 1 or sum(lengths[i] for i in g) <= max_tokens for g in groups):
            break
        parts += 1
    return min(parts, len(lengths))


def plan_passes(rows: int, *, max_rows: int = 0, lengths: Sequence[int] | None = None, max_tokens: int = 0,
                parts: int | None = None, passes: int | None = None) -> list[list[int] | None]:
    """Row indices of each pass (a forward, or a micro-batch's forward and backward) over ``rows``
    sequences: the one place micro-batches are planned.

    - ``max_tokens`` > 0: by token budget. ``lengths`` (tokens of each sequence, prompt and
      response) are split into the fewest token-balanced groups that keep within the budget
      (:func:`parts_for_budget`, :func:`token_balanced_parts`), or into exactly ``parts`` groups
      when given: a count agreed over data-parallel ranks, so that every rank runs as many
      micro-batches (the largest any rank needs, which is at least this batch's own).
    - else: consecutive runs of ``max_rows`` rows, the last one shorter.

    ``passes`` pads the plan with ``None`` up to that many passes: the count agreed over ranks for
    no-grad forwards (ZeRO-3 gathers parameters in every forward, so no rank may stop early); the
    caller runs a padding pass on any one row and drops its output. Agreeing a count is a
    collective and stays with the caller; this function only plans.

    E.g. 5 rows by 2 -> [[0, 1], [2, 3], [4]], with passes=4 -> [[0, 1], [2, 3], [4], None];
    lengths [5, 1, 4, 2] within 6 tokens -> [[0, 1], [2, 3]], with parts=3 -> [[0], [2], [1, 3]].
    No rows -> no pass (before padding).
    """
    if max_tokens > 0:
        if lengths is None or len(lengths) != rows:
            raise ValueError(f"a token budget needs the length of each of the {rows} sequences, got "
                             f"{None if lengths is None else len(lengths)} lengths")
        count = parts_for_budget(lengths, max_tokens) if parts is None else parts
        plan: list[list[int] | None] = list(token_balanced_parts(lengths, count)) if rows else []
    elif max_rows > 0:
        if parts is not None:
            raise ValueError("parts splits by token budget; by rows the count follows from max_rows")
        plan = [list(range(i, min(i + max_rows, rows))) for i in range(0, rows, max_rows)]
    else:
        raise ValueError(f"plan passes by max_tokens > 0 or max_rows > 0, got {max_tokens} and {max_rows}")
    if passes is not None:
        if passes < len(plan):
            raise ValueError(f"{passes} agreed passes are fewer than the {len(plan)} this batch needs")
        plan += [None] * (passes - len(plan))
    return plan
