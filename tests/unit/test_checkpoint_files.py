"""Checkpoint files without Ray: atomic writes, pruning, and resume resolution."""

from __future__ import annotations

import os

import pytest

from rlhf_ray.config import config_from_dict
from rlhf_ray.coordinator import checkpoint as ckpt
from rlhf_ray.runtime.pending import Done


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


def test_resume_auto_ignores_runs_of_a_longer_name(tmp_path):
    # "ppo" must not pick up "ppo2-...": the run directory format names {name} exactly.
    cfg = config_from_dict({"name": "ppo", "logging": {"run_dir": str(tmp_path / "{name}-{time}")}})
    mine, other = str(tmp_path / "ppo-20261127-100000"), str(tmp_path / "ppo2-20261127-110000")
    ckpt.save_checkpoint(mine, 3, {}, _cfg(), FakeLearners(), None)
    ckpt.save_checkpoint(other, 9, {}, _cfg(), FakeLearners(), None)
    os.utime(os.path.join(mine, "checkpoints", "iter_000003", "COMPLETE"), (1, 1))  # other is newer
    assert ckpt.resolve_resume("auto", cfg) == os.path.join(mine, "checkpoints", "iter_000003")
    assert ckpt.run_name_pattern(cfg).match("ppo-x") and not ckpt.run_name_pattern(cfg).match("ppo2-x")


def test_saving_the_same_number_again_never_leaves_it_missing(tmp_path, monkeypatch):
    run_dir = str(tmp_path)
    ckpt.save_checkpoint(run_dir, 4, {"iteration": 4, "v": 1}, _cfg(keep_last=1), FakeLearners(), None)
    # A crash right after the old copy was moved aside, before the new one is renamed into place:
    from rlhf_ray import checkpoint_files

    real_replace = os.replace

    def crash_on_the_second_rename(src, dst):
        real_replace(src, dst)
        if src.endswith(".tmp"):
            raise RuntimeError("crash")
        if dst.endswith(checkpoint_files.OLD_SUFFIX):
            raise RuntimeError("crash between the two renames")

    monkeypatch.setattr(checkpoint_files.os, "replace", crash_on_the_second_rename)
    with pytest.raises(RuntimeError, match="between the two renames"):
        ckpt.save_checkpoint(run_dir, 4, {"iteration": 4, "v": 2}, _cfg(keep_last=1), FakeLearners(), None)
    monkeypatch.undo()
    found = ckpt.complete_checkpoints(run_dir)
    assert len(found) == 1 and ckpt.load_coordinator_state(found[0]) == {"iteration": 4, "v": 1}
    # the next save of that number completes and removes the moved-aside copy
    ckpt.save_checkpoint(run_dir, 4, {"iteration": 4, "v": 3}, _cfg(keep_last=1), FakeLearners(), None)
    found = ckpt.complete_checkpoints(run_dir)
    assert [os.path.basename(p) for p in found] == ["iter_000004"]
    assert ckpt.load_coordinator_state(found[0]) == {"iteration": 4, "v": 3}
    assert not os.path.exists(found[0] + checkpoint_files.OLD_SUFFIX)


def test_publish_flushes_the_checkpoint_before_the_rename(tmp_path, monkeypatch):
    from rlhf_ray import checkpoint_files

    synced, renamed = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(checkpoint_files.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}"))
                        or real_fsync(fd))
    monkeypatch.setattr(checkpoint_files.os, "replace", lambda a, b: renamed.append(len(synced)) or real_replace(a, b))
    ckpt.save_checkpoint(str(tmp_path), 1, {}, _cfg(), FakeLearners(), None)
    tmp = str(tmp_path / "checkpoints" / "iter_000001.tmp")
    before = synced[: renamed[0]]
    assert {tmp + "/learner/rank0.pt", tmp + "/COMPLETE", tmp + "/coordinator.json", tmp} <= set(before)


def test_a_metrics_line_cut_short_by_a_crash_does_not_stop_a_resume(tmp_path):
    from rlhf_ray.runtime.metrics import MetricsSink, read_records

    sink = MetricsSink(str(tmp_path), tensorboard=False, ray_metrics=False)
    for i in range(3):
        sink.write({"iteration": i, "reward_mean": 0.5})
    sink.close()
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"iteration": 3, "reward_me')  # the crash
    assert [r["iteration"] for r in read_records(str(tmp_path / "metrics.jsonl"))] == [0, 1, 2]
    sink = MetricsSink(str(tmp_path), tensorboard=False, ray_metrics=False)
    sink.truncate_from(2)
    sink.close()
    assert [r["iteration"] for r in read_records(str(tmp_path / "metrics.jsonl"))] == [0, 1]


def _tensorboard_points(log_dir: str, tag: str) -> list[tuple[int, float]]:
    """(step, value) of ``tag`` as TensorBoard's loader shows them (restart markers honoured)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(log_dir)
    acc.Reload()
    return [(e.step, round(e.value, 6)) for e in acc.Scalars(tag)]


def test_tensorboard_shows_redone_iterations_once(tmp_path):
    # A learner restart mid-run and a resume in a new process (a new sink; supervised runs too)
    # both redo iterations: TensorBoard must show the new values only, one point per step.
    pytest.importorskip("tensorboard")
    from rlhf_ray.runtime.metrics import MetricsSink

    sink = MetricsSink(str(tmp_path), tensorboard=True, ray_metrics=False)
    for i in range(4):
        sink.write({"iteration": i, "reward_mean": float(i)})
    sink.truncate_from(2)  # a restart from the checkpoint at iteration 2
    for i in range(2, 5):
        sink.write({"iteration": i, "reward_mean": 10.0 + i})
    sink.close()
    tb = str(tmp_path / "tensorboard")
    assert _tensorboard_points(tb, "reward_mean") == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 13.0), (4, 14.0)]

    resumed = MetricsSink(str(tmp_path), tensorboard=True, ray_metrics=False)
    resumed.truncate_from(3)  # a resume from the checkpoint at iteration 3
    resumed.write({"iteration": 3, "reward_mean": 23.0})
    resumed.close()
    assert _tensorboard_points(tb, "reward_mean") == [(0, 0.0), (1, 1.0), (2, 12.0), (3, 23.0)]


def test_checkpoints_after_the_resumed_one_are_moved_aside_not_deleted(tmp_path):
    # A run resumed from iter 2 of a run that went on to 6 starts a new branch: the newest-checkpoint
    # rules (recovery, --resume <run dir>) must find iter 2, and the old branch's files must survive.
    run_dir = str(tmp_path)
    for it in (2, 4, 6):
        ckpt.save_checkpoint(run_dir, it, {"iteration": it}, _cfg(keep_last=5), FakeLearners(), None)
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(os.path.join(root, "iter_000008"))  # incomplete: moved too, it is the old branch's
    os.makedirs(os.path.join(root, "iter_000009.tmp"))  # a save's leftover: ignored anyway, left alone
    resumed_from = ckpt.complete_checkpoints(run_dir)[0]
    moved = ckpt.set_aside_after(resumed_from)
    aside = os.path.join(root, "abandoned", "after_iter_000002")
    assert moved == [os.path.join(aside, n) for n in ("iter_000004", "iter_000006", "iter_000008")]
    assert ckpt.complete_checkpoints(run_dir) == [resumed_from]
    assert ckpt.resolve_resume(run_dir, _cfg()) == resumed_from
    assert ckpt.load_coordinator_state(moved[1]) == {"iteration": 6}  # intact where it went
    assert sorted(os.listdir(root)) == ["abandoned", "iter_000002", "iter_000009.tmp"]
    # The new branch saves iter 4 and is resumed from iter 2 again: a second folder, nothing overwritten.
    ckpt.save_checkpoint(run_dir, 4, {"iteration": 4}, _cfg(keep_last=5), FakeLearners(), None)
    assert ckpt.set_aside_after(resumed_from) == [os.path.join(aside + "_2", "iter_000004")]
    assert ckpt.set_aside_after(resumed_from) == []  # nothing later any more
    assert ckpt.set_aside_after(str(tmp_path / "renamed-checkpoint")) == []  # not one of a run's
