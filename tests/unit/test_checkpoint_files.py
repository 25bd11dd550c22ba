"""Checkpoint files without Ray: atomic writes, pruning, and resume resolution."""

from __future__ import annotations

import os

import pytest

from rlhf_ray.config import config_from_dict
from rlhf_ray.coordinator import checkpoint as ckpt
from rlhf_ray.coordinator.pending import Done


class FakeLearners:
    """Writes a marker file per 'rank'; optionally dies half-way, like a crash while saving."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail

    def save_checkpoint(self, path: str, tokenizer_path):
        os.makedirs(os.path.join(path, "learner"), exist_ok=True)
        with open(os.path.join(path, "learner", "rank0.pt"), "w") as fh:
            fh.write("state")
        if self.fail:
            raise RuntimeError("learner rank 1 died while saving")
        return Done([True, True])


def _cfg(keep_last: int = 2):
    return config_from_dict({"checkpoint": {"keep_last": keep_last}})


def test_save_is_atomic_and_prunes(tmp_path):
    run_dir = str(tmp_path)
    for it in (1, 2, 3):
        ckpt.save_checkpoint(run_dir, it, {"iteration": it}, _cfg(), FakeLearners(), None)
    names = [os.path.basename(p) for p in ckpt.complete_checkpoints(run_dir)]
    assert names == ["iter_000002", "iter_000003"]
    assert ckpt.load_coordinator_state(ckpt.complete_checkpoints(run_dir)[-1]) == {"iteration": 3}


def test_crash_while_saving_leaves_previous_checkpoints_usable(tmp_path):
    run_dir = str(tmp_path)
    ckpt.save_checkpoint(run_dir, 1, {"iteration": 1}, _cfg(), FakeLearners(), None)
    with pytest.raises(RuntimeError, match="died while saving"):
        ckpt.save_checkpoint(run_dir, 2, {"iteration": 2}, _cfg(), FakeLearners(fail=True), None)
    assert [os.path.basename(p) for p in ckpt.complete_checkpoints(run_dir)] == ["iter_000001"]
    assert os.path.isdir(os.path.join(run_dir, "checkpoints", "iter_000002.tmp"))  # never mistaken for whole
    assert ckpt.resolve_resume(run_dir, _cfg()).endswith("iter_000001")
    # the next save of the same iteration replaces the leftover
    ckpt.save_checkpoint(run_dir, 2, {"iteration": 2}, _cfg(), FakeLearners(), None)
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "iter_000002.tmp"))


def test_resume_errors_say_what_to_pass(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a complete checkpoint nor a run directory"):
        ckpt.resolve_resume(str(tmp_path), _cfg())
    cfg = config_from_dict({"name": "nothing-here", "logging": {"run_dir": str(tmp_path / "runs" / "{name}-{time}")}})
    with pytest.raises(FileNotFoundError, match="--resume auto found no complete checkpoint"):
        ckpt.resolve_resume("auto", cfg)


def test_resume_auto_picks_the_newest_run_of_this_name(tmp_path):
    cfg = config_from_dict({"name": "demo", "logging": {"run_dir": str(tmp_path / "{name}-{time}")}})
    old, new = str(tmp_path / "demo-a"), str(tmp_path / "demo-b")
    ckpt.save_checkpoint(old, 5, {}, _cfg(), FakeLearners(), None)
    ckpt.save_checkpoint(new, 2, {}, _cfg(), FakeLearners(), None)
    os.utime(os.path.join(old, "checkpoints", "iter_000005", "COMPLETE"), (1, 1))
    assert ckpt.resolve_resume("auto", cfg) == os.path.join(new, "checkpoints", "iter_000002")
