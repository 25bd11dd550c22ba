"""A gold check beside the reward (``reward.gold``), and the evaluation's samples on disk.

The reward a policy is trained on is often a proxy: a reward model learned from preferences.
``reward.gold`` names a second function, ``fn(prompts, responses) -> list[float]`` like a reward
function (e.g. ``rlhf_ray.rewards:larger_number_correct``, 1 for a right answer), that is never
used for training. The run logs its mean on each iteration's samples (``gold_mean``) and on each
evaluation (``eval/gold_mean``), so a proxy reward that rises while the gold check does not
(over-optimisation of the reward model) shows in the records and in ``curves.png``. Like a
reward function it may take the prompt records' fields (``fn(prompts, responses, answer)``: the
expected answer of each sample's prompt), by the same rule (``rlhf_ray.rewards.FieldParameters``).

Each evaluation's responses go to ``<run_dir>/eval_samples/iter_NNNNNN.jsonl``, one record per
response (prompt, response, reward, gold when set): the before/after comparison of a run reads
the first and the last of these files. A multi-turn episode's response shows each observation in
``[[ ]]``: the policy was trained on the text outside them.
"""

from __future__ import annotations

import json
import math
import os

from rlhf_ray.batch import ExperienceBatch, conversations, decode_rows, marked_text
from rlhf_ray.rewards import call_once, field_parameters, load_reward_function

EVAL_SAMPLES_DIR = "eval_samples"


class GoldCheck:
    """``reward.gold`` loaded once, applied to decoded batches in the driver."""

    def __init__(self, spec: str, tokenizer) -> None:
        self.spec = spec
        self.fn = load_reward_function(spec)
        self.takes = field_parameters(self.fn)
        self.tokenizer = tokenizer

    def verdicts(self, prompts: list[str], responses: list[str], fields: dict[str, list] | None = None) -> list[float]:
        """One gold value per response; ``fields``: the prompt records' fields, one value per response."""
        scores = [float(s) for s in call_once(self.fn, prompts, responses, self.takes.pick(fields))]
        if len(scores) != len(responses):
            raise ValueError(f"reward.gold {self.spec!r} returned {len(scores)} values for {len(responses)} responses")
        return scores

    def mean(self, batch: ExperienceBatch, fields: dict[str, list] | None = None) -> float:
        """Mean gold value over the batch's samples (decoded without special tokens); ``fields``:
        one value per row."""
        prompts, responses = decode_rows(batch, self.tokenizer)
        scores = self.verdicts(prompts, responses, fields)
        return sum(scores) / len(scores) if scores else float("nan")


def eval_samples_path(run_dir: str, iteration: int) -> str:
    return os.path.join(run_dir, EVAL_SAMPLES_DIR, f"iter_{iteration:06d}.jsonl")


def write_eval_samples(run_dir: str, iteration: int, batch: ExperienceBatch, tokenizer,
                       gold: GoldCheck | None, fields: dict[str, list] | None = None) -> float | None:
    """Write one evaluation's responses (see the module docstring); returns the gold mean, or None
    without a gold check. ``fields``: the prompt records' fields, one value per row, for the check."""
    prompts, responses = decode_rows(batch, tokenizer)
    scores = batch.scores.tolist() if batch.scores is not None else [float("nan")] * len(batch)
    verdicts = gold.verdicts(prompts, responses, fields) if gold is not None else None
    if batch.action_mask is not None:  # episodes: observations in [[ ]], the policy's text outside
        responses = [marked_text(turns) for turns in conversations(batch, tokenizer)]
    path = eval_samples_path(run_dir, iteration)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        for i, (p, r, s) in enumerate(zip(prompts, responses, scores)):
            row = {"prompt": p, "response": r, "reward": s if math.isfinite(s) else None}
            if verdicts is not None:
                row["gold"] = verdicts[i]
            fh.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return sum(verdicts) / len(verdicts) if verdicts else None


def read_eval_samples(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------- before / after


def evaluations_side_by_side(run_dir: str, first: int, last: int) -> list[dict]:
    """The evaluations at iterations ``first`` and ``last`` of a run, read back, side by side."""
    return side_by_side(read_eval_samples(eval_samples_path(run_dir, first)),
                        read_eval_samples(eval_samples_path(run_dir, last)))


def side_by_side(before: list[dict], after: list[dict]) -> list[dict]:
    """Rows of two evaluations of the same prompts (the same order: evaluation prompts are fixed),
    as {prompt, before: {response, reward, gold}, after: {...}}."""
    if len(before) != len(after):
        raise ValueError(f"the two evaluations have {len(before)} and {len(after)} responses; they must match")
    keep = ("response", "reward", "gold")
    return [{"prompt": b["prompt"], "before": {k: b.get(k) for k in keep}, "after": {k: a.get(k) for k in keep}}
            for b, a in zip(before, after)]


def _verdict(gold: float | None) -> str:
    """A gold value as a word: right (1), wrong (0), the number otherwise, empty without a check."""
    if gold is None:
        return ""
    return "right" if gold == 1.0 else "wrong" if gold == 0.0 else f"{gold:.2f}"


def _cell(x: dict) -> tuple[str, str, str]:
    reward = "" if x["reward"] is None else f"{x['reward']:.2f}"
    return repr(x["response"]), reward, _verdict(x["gold"])


def format_rows(rows: list[dict], reward_name: str = "RM") -> list[str]:
    """One terminal line per row: prompt, then before -> after with reward (named ``reward_name``:
    "RM" for a reward model) and gold verdict."""
    def side(response: str, reward: str, gold: str) -> str:
        return f"{response} ({reward_name} {reward}{', ' + gold if gold else ''})"

    return [f"  {r['prompt']!r}: {side(*_cell(r['before']))} -> {side(*_cell(r['after']))}" for r in rows]


def write_samples_md(run_dir: str, first: int, last: int) -> str:
    """``<run_dir>/samples.md``: every evaluation prompt with the response at iteration ``first``
    (before training, when the run evaluated at 0) beside the one at ``last``, with the reward and
    the gold verdict of each. Returns the path."""
    rows = evaluations_side_by_side(run_dir, first, last)

    def md(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", "\\n")

    def mean(side: str, key: str) -> str:
        vals = [r[side][key] for r in rows if r[side][key] is not None]
        return f"{sum(vals) / len(vals):.3f}" if vals else "n/a"

    lines = [f"# Evaluation responses: iteration {first} vs iteration {last}", "",
             f"{len(rows)} held-out responses. Mean reward {mean('before', 'reward')} -> {mean('after', 'reward')}; "
             f"mean gold {mean('before', 'gold')} -> {mean('after', 'gold')}.", "",
             f"| # | prompt | iteration {first} | reward | gold | iteration {last} | reward | gold |",
             "|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        (b, br, bg), (a, ar, ag) = _cell(r["before"]), _cell(r["after"])
        lines.append(f"| {i} | {md(r['prompt'])} | {md(b)} | {br} | {bg} | {md(a)} | {ar} | {ag} |")
    path = os.path.join(run_dir, "samples.md")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
