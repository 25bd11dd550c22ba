"""Atomic, resumable checkpoints of a PPO run.

Layout of ``<run_dir>/checkpoints/iter_000010/``::

    learner/           the training engine's state of every rank (model, optimiser, scheduler; its shards)
    policy/            the policy as a standard Hugging Face model + value_head.safetensors + tokenizer
    coordinator.json   iteration, prompt-sampler position, KL controller, score statistics, config
    COMPLETE           written last

A checkpoint is written under ``iter_000010.tmp`` and renamed into place only when complete,
so a crash while saving leaves the previous checkpoints untouched and never a half one that
looks whole. Directories without ``COMPLETE`` are ignored when resuming.

The directory names and the atomic publishing step are ``rlhf_ray.checkpoint_files`` (shared
with the supervised trainers; re-exported here for the coordinator); this module adds what is
PPO's own: resolving ``--resume``, writing the learners' state with the coordinator's, and
reading the coordinator's state back.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from rlhf_ray.checkpoint_files import (checkpoint_path, checkpoints_dir, complete_checkpoints, publish, run_dir_of,
                                       set_aside_after)
from rlhf_ray.config import Config, config_to_dict, redacted

__all__ = ["checkpoint_path", "checkpoints_dir", "complete_checkpoints", "load_coordinator_state", "publish",
           "resolve_resume", "run_dir_of", "save_checkpoint", "set_aside_after"]


def run_name_pattern(cfg: Config) -> re.Pattern:
    """The directory names logging.run_dir gives runs of this config's name: ``{name}`` exactly,
    ``{time}`` anything (so --resume auto for ``ppo`` never picks a run of ``ppo2``)."""
    base = os.path.basename(cfg.logging.run_dir)
    parts = re.split(r"(\{name\}|\{time\})", base)
    regex = "".join(re.escape(cfg.name) if x == "{name}" else ".+" if x == "{time}" else re.escape(x) for x in parts)
    return re.compile(f"^{regex}$")


def resolve_resume(target: str, cfg: Config) -> str:
    """A checkpoint directory from ``--resume``: a checkpoint, a run directory (its latest
    complete checkpoint), or ``auto`` (the newest run of this config's name that has one)."""
    if target == "auto":
        parent = os.path.dirname(cfg.logging.run_dir.format(name=cfg.name, time="x")) or "."
        runs = [os.path.join(parent, d) for d in os.listdir(parent)] if os.path.isdir(parent) else []
        own = run_name_pattern(cfg)
        candidates = [c for r in runs if own.match(os.path.basename(r)) for c in complete_checkpoints(r)]
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


def save_checkpoint(run_dir: str, iteration: int, coordinator_state: dict, cfg: Config, learners,
                    tokenizer_path: str | None) -> str:
    """Write checkpoint ``iter_<iteration>`` atomically; prune to checkpoint.keep_last."""
    final = checkpoint_path(run_dir, iteration)
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    learners.save_checkpoint(tmp, tokenizer_path).result()
    with open(os.path.join(tmp, "coordinator.json"), "w") as fh:
        # The config is a record (secrets in URLs masked); resume reads only "coordinator".
        json.dump({"coordinator": coordinator_state, "config": redacted(config_to_dict(cfg))}, fh, indent=2)
    publish(tmp, final, f"iteration {iteration}", cfg.checkpoint.keep_last)
    return final


def load_coordinator_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, "coordinator.json")) as fh:
        return json.load(fh)["coordinator"]
