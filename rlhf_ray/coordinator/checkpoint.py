"""Atomic, resumable checkpoints of a run.

Layout of ``<run_dir>/checkpoints/iter_000010/``::

    learner/           DeepSpeed state of every rank (model, optimiser, scheduler; ZeRO shards)
    policy/            the policy as a standard Hugging Face model + value_head.safetensors + tokenizer
    coordinator.json   iteration, prompt-sampler position, KL controller, score statistics, config
    COMPLETE           written last

A checkpoint is written under ``iter_000010.tmp`` and renamed into place only when complete,
so a crash while saving leaves the previous checkpoints untouched and never a half one that
looks whole. Directories without ``COMPLETE`` are ignored when resuming.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from rlhf_ray.config import Config, config_to_dict


def _name_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"^{prefix}_(\d{{6,}})$")


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_path(run_dir: str, number: int, prefix: str = "iter") -> str:
    """``<run_dir>/checkpoints/<prefix>_<number, 6+ digits>``: the names ``complete_checkpoints`` finds."""
    return os.path.join(checkpoints_dir(run_dir), f"{prefix}_{number:06d}")


def complete_checkpoints(run_dir: str, prefix: str = "iter") -> list[str]:
    """Complete checkpoints of a run, oldest first (``<prefix>_<number>``: iter for PPO runs,
    step for the supervised trainers)."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    pattern = _name_pattern(prefix)
    found = []
    for name in os.listdir(root):
        m = pattern.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "COMPLETE")):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


def resolve_resume(target: str, cfg: Config) -> str:
    """A checkpoint directory from ``--resume``: a checkpoint, a run directory (its latest
    complete checkpoint), or ``auto`` (the newest run of this config's name that has one)."""
    if target == "auto":
        parent = os.path.dirname(cfg.logging.run_dir.format(name=cfg.name, time="x")) or "."
        runs = [os.path.join(parent, d) for d in os.listdir(parent)] if os.path.isdir(parent) else []
        candidates = [c for r in runs if os.path.basename(r).startswith(cfg.name) for c in complete_checkpoints(r)]
        if not candidates:
            raise FileNotFoundError(f"--resume auto found no complete checkpoint under {parent!r} for runs named "
                                    f"{cfg.name!r}; pass a run or checkpoint directory instead.")
        return max(candidates, key=lambda c: os.path.getmtime(os.path.join(c, "COMPLETE")))
    if os.path.isfile(os.path.join(target, "COMPLETE")):
        return target
    found = complete_checkpoints(target)
    if not found:
        raise FileNotFoundError(f"--resume {target!r} is neither a complete checkpoint nor a run directory with "
                                "one (incomplete *.tmp checkpoints are ignored).")
    return found[-1]


def run_dir_of(checkpoint: str) -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


def save_checkpoint(run_dir: str, iteration: int, coordinator_state: dict, cfg: Config, learners,
                    tokenizer_path: str | None) -> str:
    """Write checkpoint ``iter_<iteration>`` atomically; prune to checkpoint.keep_last."""
    final = checkpoint_path(run_dir, iteration)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    learners.save_checkpoint(tmp, tokenizer_path).result()
    with open(os.path.join(tmp, "coordinator.json"), "w") as fh:
        json.dump({"coordinator": coordinator_state, "config": config_to_dict(cfg)}, fh, indent=2)
    publish(tmp, final, f"iteration {iteration}", cfg.checkpoint.keep_last)
    return final


def publish(tmp: str, final: str, note: str, keep_last: int, prefix: str = "iter") -> None:
    """Mark the fully written ``tmp`` COMPLETE, move it to ``final`` and delete all but the newest
    ``keep_last`` complete checkpoints beside it."""
    with open(os.path.join(tmp, "COMPLETE"), "w") as fh:
        fh.write(note + "\n")
    if os.path.isdir(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in complete_checkpoints(run_dir_of(final), prefix)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_coordinator_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, "coordinator.json")) as fh:
        return json.load(fh)["coordinator"]
