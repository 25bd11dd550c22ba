"""Names and atomic publishing of checkpoint directories, shared by the PPO coordinator and the
supervised trainers. Standard library only.

A run keeps its checkpoints as ``<run_dir>/checkpoints/<prefix>_<number, 6+ digits>`` (``iter``
for PPO iterations, ``step`` for supervised optimiser steps). Each is written under
``<name>.tmp``, marked with a ``COMPLETE`` file once whole, and renamed into place, so a crash
while saving never leaves a half checkpoint that looks whole; directories without ``COMPLETE``
are ignored. A run resumed from an older checkpoint moves the later ones into
``checkpoints/abandoned/`` (:func:`set_aside_after`), where they are not found either.
"""

from __future__ import annotations

import os
import re
import shutil


OLD_SUFFIX = ".old"  # a checkpoint being replaced by a new save of the same number


def name_pattern(prefix: str) -> re.Pattern:
    """Matches ``<prefix>_<number>`` (6 or more digits), optionally with the ``.old`` suffix of a
    checkpoint being replaced; group 1 is the number, group 2 the suffix."""
    return re.compile(rf"^{prefix}_(\d{{6,}})({re.escape(OLD_SUFFIX)})?$")


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
    found: dict[int, str] = {}
    for name in sorted(os.listdir(root), key=lambda n: n.endswith(OLD_SUFFIX)):  # a primary before its .old
        m = pattern.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "COMPLETE")):
            found.setdefault(int(m.group(1)), path)
    return [found[n] for n in sorted(found)]


ASIDE_DIR = "abandoned"  # under checkpoints/: where a resume from an older checkpoint moves the later ones


def set_aside_after(checkpoint: str, prefix: str = "iter") -> list[str]:
    """Move every checkpoint of ``checkpoint``'s run numbered after it (complete or not, ``.old``
    included) into ``checkpoints/abandoned/after_<name>[_k]/``, where :func:`complete_checkpoints`
    no longer finds them; returns their new paths, oldest first (none for a directory not named
    ``<prefix>_<number>``).

    A run resumed from an older checkpoint starts a new branch in the same run directory: the
    later checkpoints belong to the branch it left, and taking the newest checkpoint (recovery of
    a lost learner, ``--resume <run dir>``) would jump back onto that branch. They are moved, not
    deleted: a resume from the wrong checkpoint loses nothing."""
    pattern = name_pattern(prefix)
    m = pattern.match(os.path.basename(os.path.normpath(checkpoint)))
    if m is None:  # not one of a run's checkpoints (renamed): no branch to leave
        return []
    number, root = int(m.group(1)), os.path.dirname(os.path.abspath(checkpoint))
    later = sorted((int(x.group(1)), name) for name in os.listdir(root)
                   if (x := pattern.match(name)) and int(x.group(1)) > number
                   and os.path.isdir(os.path.join(root, name)))
    if not later:
        return []
    base = os.path.join(root, ASIDE_DIR, f"after_{prefix}_{number:06d}")
    aside, k = base, 1
    while os.path.exists(aside):  # resumed from the same checkpoint before
        k += 1
        aside = f"{base}_{k}"
    os.makedirs(aside)
    moved = []
    for _, name in later:
        os.replace(os.path.join(root, name), os.path.join(aside, name))
        moved.append(os.path.join(aside, name))
    _fsync(aside)
    _fsync(root)
    return moved


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: str) -> None:
    """Flush every file and directory under ``root`` (and ``root``) to disk."""
    for here, _, files in os.walk(root):
        for name in files:
            _fsync(os.path.join(here, name))
        _fsync(here)


def publish(tmp: str, final: str, note: str, keep_last: int, prefix: str = "iter") -> None:
    """Mark the fully written ``tmp`` COMPLETE, move it to ``final`` and delete all but the newest
    ``keep_last`` complete checkpoints beside it.

    Everything is flushed to disk before the rename (a crash or power loss after it finds the
    checkpoint whole). A checkpoint already at ``final`` (the same number saved again) is first
    renamed to ``<final>.old``, which :func:`complete_checkpoints` still finds until the new one
    is in place, so there is no moment without a complete checkpoint of that number."""
    with open(os.path.join(tmp, "COMPLETE"), "w") as fh:
        fh.write(note + "\n")
    _fsync_tree(tmp)
    previous = final + OLD_SUFFIX
    if os.path.isdir(final):
        shutil.rmtree(previous, ignore_errors=True)
        os.replace(final, previous)
    os.replace(tmp, final)
    _fsync(os.path.dirname(final))
    shutil.rmtree(previous, ignore_errors=True)
    for old in complete_checkpoints(run_dir_of(final), prefix)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
