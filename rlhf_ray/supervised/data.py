"""SFT examples and preference pairs: rendering records as text, the length policy, tokenising
into padded tensors, and the train/eval splits.

Records come from ``records.py`` (JSONL or Parquet through Hugging Face ``datasets``; field names
from the config), rendered either as plain ``prompt`` + ``response`` text or as chat messages
through the tokenizer's chat template. Then the length policy (truncate / drop, both counted, or
error) and tokenisation:

- :class:`SFTBatch`: ``input_ids`` with a ``loss_mask`` that is True on response tokens only;
- :class:`PairBatch`: chosen and rejected token ids of each pair, built by the rule of
  ``rlhf_ray/data/rm_inputs.py`` (prompt ids + response ids + EOS), the rule by which the PPO
  reward role (``workers/frozen.py``) builds what it scores, so the reward model sees the same
  token sequences in training and in PPO.

Every problem with a record (a field absent, a record too long under ``too_long: error``, a split
left empty) raises :class:`DataError` naming the file, the record and the flag to change.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from rlhf_ray.data.prompts import pad_token_id
from rlhf_ray.data.records import DataError, as_messages, read_records, render_chat, require_fields
from rlhf_ray.data.rm_inputs import encode_prompts, encode_responses
from rlhf_ray.supervised.config import PreferenceDataConfig, SFTDataConfig


# --------------------------------------------------------------------------- length policy


@dataclass
class LengthStats:
    """What the length policy did to one split's records."""

    records: int = 0
    kept: int = 0
    truncated: int = 0  # kept, but cut to max_len
    dropped: int = 0  # too long (drop), or nothing of the response left after truncation

    def describe(self) -> str:
        return f"{self.kept}/{self.records} kept, {self.truncated} truncated, {self.dropped} dropped"


def _apply_limit(n_prompt: int, ids: list[int], max_len: int, policy: str,
                 where: str) -> tuple[list[int] | None, bool]:
    """(ids within ``max_len`` or None when dropped, whether they were cut). Prompt tokens come
    first; truncation keeps the prompt and cuts the response's end, and a record whose prompt
    alone fills ``max_len`` is dropped (nothing would be left to learn or score)."""
    if len(ids) <= max_len:
        return ids, False
    if policy == "error":
        raise DataError(f"{where} has {len(ids)} tokens, more than --data.max_len {max_len}; raise the limit or "
                        "set --data.too_long truncate|drop.")
    if policy == "drop" or n_prompt >= max_len:
        return None, False
    return ids[:max_len], True


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (N, L) int64 ids and the bool (N, L) attention mask."""
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = True
    return ids, mask


def _trim_width(mask: torch.Tensor) -> int:
    return int(mask.sum(dim=1).max()) if mask.numel() else 0


# --------------------------------------------------------------------------- SFT examples


@dataclass
class SFTBatch:
    """Right-padded SFT examples. N sequences, L positions."""

    input_ids: torch.Tensor  # (N, L) int64, pad id beyond each sequence
    attention_mask: torch.Tensor  # (N, L) bool, True = real token
    loss_mask: torch.Tensor  # (N, L) bool, True = a response token (a target of the loss)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> "SFTBatch":
        index = torch.as_tensor(index, dtype=torch.long)
        return SFTBatch(self.input_ids[index], self.attention_mask[index], self.loss_mask[index])

    def to(self, device: torch.device | str) -> "SFTBatch":
        return SFTBatch(self.input_ids.to(device), self.attention_mask.to(device), self.loss_mask.to(device))

    def trim(self) -> "SFTBatch":
        """Drop columns that are padding in every row."""
        w = _trim_width(self.attention_mask)
        return SFTBatch(self.input_ids[:, :w], self.attention_mask[:, :w], self.loss_mask[:, :w])

    def num_target_tokens(self) -> int:
        """Tokens the loss counts: response tokens that have a preceding position to predict them."""
        return int(self.loss_mask[:, 1:].sum())


def tokenize_sft(pairs: Sequence[tuple[str, str]], tokenizer, max_len: int, too_long: str, add_eos: bool,
                 chat: bool, where: str) -> tuple[SFTBatch, LengthStats]:
    """Tokenise (prompt, response) texts; the prompt as PPO tokenises it (``rm_inputs.encode_prompts``:
    special tokens for a plain prompt, none for a chat rendering, no second BOS); the response
    without special tokens, plus EOS if ``add_eos``."""
    stats = LengthStats(records=len(pairs))
    prompts = encode_prompts(tokenizer, [p for p, _ in pairs], chat)
    responses = tokenizer([r for _, r in pairs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    rows, masks = [], []
    for i, (p_ids, r_ids) in enumerate(zip(prompts, responses)):
        r_ids = list(r_ids)
        if add_eos and eos is not None and (not r_ids or r_ids[-1] != eos):
            r_ids.append(eos)
        if not r_ids or not p_ids:  # nothing to learn, or no position to predict the first token from
            stats.dropped += 1
            continue
        ids, cut = _apply_limit(len(p_ids), list(p_ids) + r_ids, max_len, too_long, f"{where} record {i}")
        if ids is None:
            stats.dropped += 1
            continue
        stats.truncated += cut
        rows.append(ids)
        masks.append([False] * len(p_ids) + [True] * (len(ids) - len(p_ids)))
        stats.kept += 1
    ids_t, attn = _pad(rows, pad_token_id(tokenizer))
    loss_mask = torch.zeros_like(attn)
    for i, m in enumerate(masks):
        loss_mask[i, :len(m)] = torch.tensor(m, dtype=torch.bool)
    return SFTBatch(ids_t, attn, loss_mask), stats


def sft_texts(ds, cfg: SFTDataConfig, tokenizer, path: str) -> list[tuple[str, str]]:
    """(prompt, response) texts of every record, per ``data.template``."""
    if cfg.template == "chat":
        require_fields(ds, {"--data.messages_field": cfg.messages_field}, path)
        return [render_chat(tokenizer, as_messages(m, f"{path!r} record {i}", cfg.messages_field), path, i)
                for i, m in enumerate(ds[cfg.messages_field])]
    require_fields(ds, {"--data.prompt_field": cfg.prompt_field, "--data.response_field": cfg.response_field}, path)
    return [(str(p), str(r)) for p, r in zip(ds[cfg.prompt_field], ds[cfg.response_field])]


# --------------------------------------------------------------------------- preference pairs


@dataclass
class PairBatch:
    """Right-padded preference pairs. N pairs; each side padded to its own width."""

    chosen_ids: torch.Tensor  # (N, Lc) int64
    chosen_mask: torch.Tensor  # (N, Lc) bool, True = real token
    rejected_ids: torch.Tensor  # (N, Lr) int64
    rejected_mask: torch.Tensor  # (N, Lr) bool
    margin: torch.Tensor | None = None  # (N,) float32, or None for no margin

    def __len__(self) -> int:
        return self.chosen_ids.shape[0]

    def select(self, index: torch.Tensor | Sequence[int]) -> "PairBatch":
        index = torch.as_tensor(index, dtype=torch.long)
        return PairBatch(self.chosen_ids[index], self.chosen_mask[index], self.rejected_ids[index],
                         self.rejected_mask[index], None if self.margin is None else self.margin[index])

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(self.chosen_ids.to(device), self.chosen_mask.to(device), self.rejected_ids.to(device),
                         self.rejected_mask.to(device), None if self.margin is None else self.margin.to(device))

    def trim(self) -> "PairBatch":
        wc, wr = _trim_width(self.chosen_mask), _trim_width(self.rejected_mask)
        return PairBatch(self.chosen_ids[:, :wc], self.chosen_mask[:, :wc], self.rejected_ids[:, :wr],
                         self.rejected_mask[:, :wr], self.margin)

    def stacked(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Chosen rows then rejected rows as one (2N, L) batch (ids, bool mask): one forward pass."""
        w = max(self.chosen_ids.shape[1], self.rejected_ids.shape[1])

        def widen(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            extra = w - ids.shape[1]
            return (torch.nn.functional.pad(ids, (0, extra), value=pad_id),
                    torch.nn.functional.pad(mask, (0, extra), value=False))

        (ci, cm), (ri, rm) = widen(self.chosen_ids, self.chosen_mask), widen(self.rejected_ids, self.rejected_mask)
        return torch.cat([ci, ri]), torch.cat([cm, rm])


@dataclass
class PreferenceTexts:
    """Each pair's two sides as (prompt, response) texts: a chat side's prompt is the template's
    rendering up to the assistant's turn, its response the rest (``render_chat``)."""

    chosen: list[tuple[str, str]]
    rejected: list[tuple[str, str]]
    margins: list[float] | None = field(default=None)


def preference_texts(ds, cfg: PreferenceDataConfig, tokenizer, path: str) -> PreferenceTexts:
    sides = {"--data.chosen_field": cfg.chosen_field, "--data.rejected_field": cfg.rejected_field}
    margins = None
    if cfg.margin_field:
        require_fields(ds, {"--data.margin_field": cfg.margin_field}, path)
        margins = [float(m) for m in ds[cfg.margin_field]]
    if cfg.template == "chat":
        require_fields(ds, sides, path)
        has_prompt = cfg.prompt_field in ds.column_names
        out = PreferenceTexts([], [], margins)
        for i, rec in enumerate(ds):
            head = as_messages(rec[cfg.prompt_field], f"{path!r} record {i}", cfg.prompt_field) if has_prompt else []
            for name, texts in ((cfg.chosen_field, out.chosen), (cfg.rejected_field, out.rejected)):
                side = rec[name]
                if isinstance(side, str) and not head:
                    raise DataError(f"{path!r} record {i}: {name!r} is a plain response but the record has no "
                                    f"prompt field {cfg.prompt_field!r}; give messages or set --data.prompt_field.")
                turns = [{"role": "assistant", "content": side}] if isinstance(side, str) else \
                    as_messages(side, f"{path!r} record {i}", name)
                texts.append(render_chat(tokenizer, head + turns, path, i))
        return out
    require_fields(ds, {"--data.prompt_field": cfg.prompt_field, **sides}, path)
    prompts = [str(p) for p in ds[cfg.prompt_field]]
    return PreferenceTexts([(p, str(c)) for p, c in zip(prompts, ds[cfg.chosen_field])],
                           [(p, str(r)) for p, r in zip(prompts, ds[cfg.rejected_field])], margins)


def _side_ids(tokenizer, side: list[tuple[str, str]], chat: bool) -> list[tuple[list[int], int]]:
    """(ids, number of prompt tokens) of each (prompt, response): the reward model's input by the
    rule of ``rm_inputs`` (the one the PPO reward role scores by), each response finished with EOS."""
    prompts = encode_prompts(tokenizer, [p for p, _ in side], chat)
    responses = encode_responses(tokenizer, [r for _, r in side], finished=True)
    return [(p + r, len(p)) for p, r in zip(prompts, responses)]


def tokenize_pairs(texts: PreferenceTexts, tokenizer, max_len: int, too_long: str, chat: bool,
                   where: str) -> tuple[PairBatch, LengthStats]:
    """Tokenise both sides of each pair; a pair is kept or dropped as a whole."""
    stats = LengthStats(records=len(texts.chosen))
    chosen, rejected = _side_ids(tokenizer, texts.chosen, chat), _side_ids(tokenizer, texts.rejected, chat)
    keep_c, keep_r, keep_m = [], [], []
    for i, ((c, n_c), (r, n_r)) in enumerate(zip(chosen, rejected)):
        c2, cut_c = _apply_limit(n_c, c, max_len, too_long, f"{where} pair {i} (chosen)")
        r2, cut_r = _apply_limit(n_r, r, max_len, too_long, f"{where} pair {i} (rejected)")
        if c2 is None or r2 is None:
            stats.dropped += 1
            continue
        stats.truncated += cut_c or cut_r
        keep_c.append(c2)
        keep_r.append(r2)
        if texts.margins is not None:
            keep_m.append(texts.margins[i])
        stats.kept += 1
    pad = pad_token_id(tokenizer)
    (ci, cm), (ri, rm) = _pad(keep_c, pad), _pad(keep_r, pad)
    margin = torch.tensor(keep_m, dtype=torch.float32) if texts.margins is not None else None
    return PairBatch(ci, cm, ri, rm, margin), stats


# --------------------------------------------------------------------------- train / eval splits


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic (train, eval) record indices; eval gets round(n * fraction), at least 1 if
    fraction > 0, and train keeps at least one record."""
    if fraction <= 0:
        return list(range(n)), []
    n_eval = min(max(1, round(n * fraction)), n - 1)
    if n_eval < 1:
        raise DataError(f"only {n} record(s): too few to hold out --data.eval_fraction {fraction}; "
                        "add records or set --data.eval_path.")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _splits(cfg, seed: int):
    """(train dataset, eval dataset or None, path of each) per eval_path / eval_fraction."""
    train = read_records(cfg.train_path, cfg.format, "--data.train_path")
    if cfg.eval_path:
        return train, read_records(cfg.eval_path, cfg.format, "--data.eval_path"), cfg.train_path, cfg.eval_path
    tr, ev = holdout_split(len(train), cfg.eval_fraction, seed)
    held = train.select(ev) if ev else None
    return train.select(tr), held, cfg.train_path, f"{cfg.train_path} (held out)"


@dataclass
class SFTData:
    train: SFTBatch
    eval: SFTBatch | None
    stats: dict[str, LengthStats]  # "train", "eval"


@dataclass
class PreferenceData:
    train: PairBatch
    eval: PairBatch | None
    stats: dict[str, LengthStats]


def _check_nonempty(stats: LengthStats, where: str) -> None:
    if stats.kept == 0:
        raise DataError(f"no record of {where} is left after the length policy ({stats.describe()}); raise "
                        "--data.max_len or set --data.too_long truncate.")


def _tokenized_splits(cfg: SFTDataConfig | PreferenceDataConfig, seed: int, tokenize) -> tuple[dict, dict]:
    """The train and (if any) eval split, each through ``tokenize(ds, where) -> (data, LengthStats)``;
    a split with no record left after the length policy is an error."""
    train_ds, eval_ds, train_where, eval_where = _splits(cfg, seed)
    out, stats = {}, {}
    for name, ds, where in (("train", train_ds, train_where), ("eval", eval_ds, eval_where)):
        if ds is None:
            continue
        out[name], stats[name] = tokenize(ds, where)
        _check_nonempty(stats[name], where)
    return out, stats


def load_sft_data(cfg: SFTDataConfig, tokenizer, seed: int) -> SFTData:
    """Read, render, length-limit and tokenise the SFT train and eval sets."""
    chat = cfg.template == "chat"
    out, stats = _tokenized_splits(cfg, seed, lambda ds, where: tokenize_sft(
        sft_texts(ds, cfg, tokenizer, where), tokenizer, cfg.max_len, cfg.too_long, cfg.add_eos, chat, where))
    return SFTData(out["train"], out.get("eval"), stats)


def load_preference_data(cfg: PreferenceDataConfig, tokenizer, seed: int) -> PreferenceData:
    """Read, render, length-limit and tokenise the preference train and eval pairs."""
    chat = cfg.template == "chat"
    out, stats = _tokenized_splits(cfg, seed, lambda ds, where: tokenize_pairs(
        preference_texts(ds, cfg, tokenizer, where), tokenizer, cfg.max_len, cfg.too_long, chat, where))
    return PreferenceData(out["train"], out.get("eval"), stats)
