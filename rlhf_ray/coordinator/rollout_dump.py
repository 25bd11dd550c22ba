"""Rollout dumps for inspecting what the policy does (reward hacking, length drift):
``--logging.dump_rollouts_every N`` writes every Nth iteration's batch to
``<run_dir>/rollouts/iter_NNNNNN.jsonl``, one JSON object per sample:

- ``iteration``, ``sample`` (row in the batch), ``group`` (prompt group id within the batch);
- ``prompt``, ``response``: text, padding and special tokens removed;
- ``reward``: the reward role's score, before penalties, clipping and normalisation;
- ``kl``: the sample's KL to the reference, the configured ``ppo.kl_estimator`` summed over its
  response tokens (the quantity ``kl_mean`` averages);
- ``advantage``: mean over the response tokens; ``advantages``: per token (GAE gives each token
  its own; the critic-free estimators repeat the sample's value);
- ``response_tokens``, ``finish_reason`` (``stop``: ended with EOS / a stop token; ``length``:
  cut at ``rollout.max_new_tokens``), ``quarantined`` (NaN/inf somewhere: its numbers are zeroed
  and it trained on nothing).
- multi-turn episodes (``rollout.env``) also: ``turns`` (the policy's) and ``conversation``, the
  response as ``{"role": "policy" | "observation", "text"}`` entries (observations are context,
  not trained on); ``kl`` and ``advantages`` then cover the policy's tokens only.

The driver only slices tensors it already holds (the iteration's batch is on the CPU); decoding
and writing run on one background thread, so the loop does not wait for them.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from rlhf_ray.algorithms import kl_estimate
from rlhf_ray.batch import ExperienceBatch, conversations, decode_rows


def rollout_rows(batch: ExperienceBatch, tokenizer, iteration: int, kl_estimator: str) -> list[dict]:
    """One record per sample of a scored batch with advantages (see the module docstring)."""
    P = batch.prompt_len
    real = batch.attention_mask[:, P:]  # (B, R) bool: the response's tokens, quarantined rows too
    bad = batch.bad_rows if batch.bad_rows is not None else torch.zeros(len(batch), dtype=torch.bool)
    acts = real if batch.action_mask is None else batch.action_mask  # an episode's observations are not counted
    counted = acts & ~bad[:, None]
    kl = (kl_estimate(batch.old_logprobs, batch.ref_logprobs, kl_estimator) * counted).sum(-1)  # (B,)
    n = counted.sum(-1)
    adv_mean = (batch.advantages * counted).sum(-1) / n.clamp(min=1)
    prompts, responses = decode_rows(batch, tokenizer)
    turns = conversations(batch, tokenizer) if batch.action_mask is not None else None
    rows = []
    for i in range(len(batch)):
        rows.append({
            "iteration": iteration, "sample": i, "group": int(batch.prompt_index[i]),
            "prompt": prompts[i], "response": responses[i],
            "reward": float(batch.scores[i]), "kl": float(kl[i]), "advantage": float(adv_mean[i]),
            "advantages": [round(float(a), 6) for a in batch.advantages[i][counted[i]]],
            "response_tokens": int(real[i].sum()),
            "finish_reason": "length" if bool(batch.truncated[i]) else "stop",
            "quarantined": bool(bad[i]),
        })
        if turns is not None:
            rows[-1].update(turns=sum(t["role"] == "policy" for t in turns[i]), conversation=turns[i])
    return rows


def dump_path(run_dir: str, iteration: int) -> str:
    return os.path.join(run_dir, "rollouts", f"iter_{iteration:06d}.jsonl")


def write_rows(path: str, rows: list[dict]) -> None:
    """Write atomically (a redone iteration replaces its file; a crash leaves no half file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(tmp, path)


class RolloutDumper:
    """Writes the batch of every ``every``-th iteration in the background (``every`` 0: never)."""

    def __init__(self, run_dir: str, every: int, tokenizer, kl_estimator: str) -> None:
        self.run_dir, self.every, self.tokenizer, self.kl_estimator = run_dir, every, tokenizer, kl_estimator
        self._pool: ThreadPoolExecutor | None = None
        self._last: Future | None = None

    def wants(self, iteration: int) -> bool:
        return self.every > 0 and iteration % self.every == 0

    def maybe_dump(self, iteration: int, batch: ExperienceBatch | None) -> str | None:
        """Queue the dump of ``batch`` (iteration ``iteration``); returns the file it goes to."""
        if batch is None or not self.wants(iteration):
            return None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout-dump")
        self._raise_failure()
        path = dump_path(self.run_dir, iteration)
        self._last = self._pool.submit(self._write, path, batch, iteration)
        return path

    def _write(self, path: str, batch: ExperienceBatch, iteration: int) -> None:
        write_rows(path, rollout_rows(batch, self.tokenizer, iteration, self.kl_estimator))

    def _raise_failure(self) -> None:
        if self._last is not None and self._last.done():
            self._last.result()  # a failed dump (disk full, ...) surfaces instead of vanishing

    def close(self) -> None:
        """Wait for the dumps in flight."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
            self._raise_failure()
