"""Names and atomic publishing of checkpoint directories, shared by the PPO coordinator and the
supervised trainers. Standard library only.

A run keeps its checkpoints as ``<run_dir>/checkpoints/<prefix>_<number, 6+ digits>`` (``iter``
for PPO iterations, ``step`` for supervised optimiser steps). Each is written under
``<name>.tmp``, marked with a ``COMPLETE`` file once whole, and renamed into place, so a crash
while saving never leaves a half checkpoint that looks whole; directories without ``COMPLETE``
are ignored.
"""

from __future__ import annotations

import os
import re
import shutil


def name_pattern(prefix: str) -> re.Pattern:
    """Matches ``<prefix>_<number>`` (6 or more digits); group 1 is the number."""
    return re.compile(rf"^{prefix}_(\d{{6,}})$")


def checkpoints_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_path(run_dir: str, number: int, prefix: str = "iter") -> str:
    """``<run_dir>/checkpoints/<prefix>_<number, 6+ digits>``: the names ``complete_checkpoints`` finds."""
    return os.path.join(checkpoints_dir(run_dir), f"{prefix}_{number:06d}")


def run_dir_of(checkpoint: str) -> str:
    """The run directory a checkpoint directory belongs to (two levels up)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(checkpoint)))


def complete_checkpoints(run_dir: str, prefix: str = "iter") -> list[str]:
    """Complete checkpoints of a run, oldest first (``<prefix>_<number>``: iter for PPO runs,
    step for the supervised trainers)."""
    root = checkpoints_dir(run_dir)
    if not os.path.isdir(root):
        return []
    pattern = name_pattern(prefix)
    found = []
    for name in os.listdir(root):
        m = pattern.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "COMPLETE")):
            found.append((int(m.group(1)), path))
    return [p for _, p in sorted(found)]


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
