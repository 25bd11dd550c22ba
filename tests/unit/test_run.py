"""The run's lifecycle (``rlhf_ray.coordinator.run.Run``) over the loop tests' in-process fakes:
iterate, evaluate, checkpoint, recover, resume, finish. No Ray."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rlhf_ray.config import CheckpointConfig, config_from_dict
from rlhf_ray.coordinator import checkpoint as ckpt
from rlhf_ray.coordinator.loop import NonFiniteError
from rlhf_ray.coordinator.preflight import Inputs
from rlhf_ray.coordinator.records import print_summary
from rlhf_ray.coordinator.run import Run, roles_line
from rlhf_ray.runtime.pending import Done, RemoteCallError
from tests.unit.test_coordinator import (EOS, PAD, AllNaNReward, FakeLearners, FakeReward, _config, _coordinator,
                                         _prompts)


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids if not (skip_special_tokens and i in (PAD, EOS)))


class CheckpointingLearners(FakeLearners):
    """Fake learners that also save and load (an empty learner directory)."""

    def __init__(self, fail_train_at: int | None = None) -> None:
        super().__init__()
        self.fail_train_at, self.saved, self.loaded = fail_train_at, [], []

    def train(self, update, iteration):
        if iteration == self.fail_train_at:
            self.fail_train_at = None  # the replacement works
            raise RemoteCallError("rank died", "died", ("learner", 0), "PPO update")
        return super().train(update, iteration)

    def save_checkpoint(self, path, tokenizer_path):
        os.makedirs(os.path.join(path, "learner"))
        self.saved.append(path)
        return Done([True])

    def load_checkpoint(self, path):
        self.loaded.append(path)
        return Done([True])


class FakeRoles:
    def __init__(self, learners) -> None:
        self.learners, self.placement = learners, {"learner-0": {"pid": 1}}
        self.restarts, self.replaced, self.shut = 0, [], False

    def replace(self, source) -> None:
        self.replaced.append(source)

    def restart_learners(self) -> None:
        self.restarts += 1

    def lost_node(self, source) -> None:  # every node stays up here
        return None

    def shutdown(self) -> None:
        self.shut = True


def _run(tmp_path, learners=None, eval_every: int = 0, scorer=None, ppo: dict | None = None,
         **cfg_sections) -> Run:
    cfg = _config(ppo={"iterations": 4, **(ppo or {})},
                  logging={"tensorboard": False, "progress_bar": False, "log_every": 2},
                  eval={"every": eval_every}, **cfg_sections)
    learners = learners or CheckpointingLearners()
    coord = _coordinator(cfg, learners=learners, eval_prompts=_prompts(2) if eval_every else None,
                         **({"reward": scorer} if scorer is not None else {}))
    inputs = Inputs(_prompts(), PAD, [EOS], CharTokenizer(), _prompts(2) if eval_every else None)
    return Run(cfg, str(tmp_path), inputs, FakeRoles(learners), coord, say=lambda line: None)


def _rows(path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def test_iterate_then_finish_writes_one_record_per_iteration_and_a_final_checkpoint(tmp_path):
    run = _run(tmp_path, eval_every=2, checkpoint={"every": 3})
    run.iterate()
    summary = run.finish()
    assert [r["iteration"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert [r["iteration"] for r in _rows(tmp_path / "eval.jsonl")] == [0, 2, 4]  # before, every 2, after
    assert [os.path.basename(p) for p in run.roles.learners.saved] == ["iter_000003.tmp", "iter_000004.tmp"]
    assert summary["completed"] and summary["iterations"] == 4 and summary["final_iteration"] == 4
    assert summary["eval"]["last"]["iteration"] == 4 and run.roles.shut
    assert json.loads((tmp_path / "summary.json").read_text())["iterations"] == 4


def test_a_dead_learner_restarts_the_group_and_the_iterations_run_again(tmp_path):
    learners = CheckpointingLearners(fail_train_at=3)
    run = _run(tmp_path, learners=learners, checkpoint={"every": 2})
    run.iterate()
    run.finish()
    # iteration 3 failed after the checkpoint at 2: the group restarts from it and redoes 2 and 3
    assert run.roles.restarts == 1 and learners.loaded == [str(tmp_path / "checkpoints" / "iter_000002")]
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["faults/learner_restarts"] == 1.0


def test_a_role_that_raises_is_not_retried(tmp_path):
    class Raising(CheckpointingLearners):
        def train(self, update, iteration):
            raise RemoteCallError("bad data", "error", ("learner", 0), "PPO update")

    run = _run(tmp_path, learners=Raising())
    with pytest.raises(RemoteCallError, match="bad data"):
        run.iterate()
    assert run.roles.restarts == 0


def test_resume_continues_at_the_checkpoint_and_forgets_later_records(tmp_path):
    first = _run(tmp_path, checkpoint={"every": 2})
    first.iterate()
    first.finish()
    checkpoint = str(tmp_path / "checkpoints" / "iter_000002")
    assert os.path.isdir(checkpoint)
    again = _run(tmp_path)
    again.resume(checkpoint)
    assert again.coord.iteration == 2 and again.coord.weights_stale
    assert [r["iteration"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1]
    again.iterate()
    again.finish()
    assert [r["iteration"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]


def test_stop_request_ends_after_the_current_iteration_with_a_checkpoint(tmp_path):
    run = _run(tmp_path)
    original = run.coord.step

    def step_then_stop():
        metrics = original()
        run.stop.requested = True  # as SIGTERM would, mid-iteration
        return metrics

    run.coord.step = step_then_stop
    run.iterate()
    summary = run.finish()
    assert summary["iterations"] == 1 and summary["stopped"] and not summary["completed"]
    assert [os.path.basename(p) for p in run.roles.learners.saved] == ["iter_000001.tmp"]
    assert torch.is_tensor(run.coord.last_batch.input_ids)


def test_gold_check_is_logged_and_evaluations_are_written_side_by_side(tmp_path):
    from rlhf_ray.coordinator.gold import GoldCheck, read_eval_samples

    gold_file = tmp_path / "gold.py"
    gold_file.write_text("def odd(prompts, responses):\n    return [float(len(r) % 2) for r in responses]\n")
    run = _run(tmp_path / "run", eval_every=2, reward={"gold": f"{gold_file}:odd"})
    run.inputs.gold = GoldCheck(f"{gold_file}:odd", CharTokenizer())  # what preflight builds
    run.iterate()
    summary = run.finish()
    metrics = _rows(tmp_path / "run" / "metrics.jsonl")
    assert all(0.0 <= r["gold_mean"] <= 1.0 for r in metrics) and len(metrics) == 4
    evals = _rows(tmp_path / "run" / "eval.jsonl")
    for ev in evals:  # each evaluation's file holds its responses, their rewards and gold verdicts
        rows = read_eval_samples(tmp_path / "run" / "eval_samples" / f"iter_{ev['iteration']:06d}.jsonl")
        assert len(rows) == ev["eval/samples"]
        assert [r["gold"] for r in rows] == [float(len(r["response"]) % 2) for r in rows]
        assert ev["eval/gold_mean"] == pytest.approx(sum(r["gold"] for r in rows) / len(rows))
    md = (tmp_path / "run" / "samples.md").read_text()
    assert summary["samples"].endswith("samples.md")
    assert "iteration 0 vs iteration 4" in md and md.count("\n| ") == 1 + len(rows)  # header + one row per response


def test_without_a_gold_check_evaluations_are_still_written(tmp_path):
    run = _run(tmp_path, eval_every=2)
    run.iterate()
    run.finish()
    assert "gold_mean" not in _rows(tmp_path / "metrics.jsonl")[0]
    rows = _rows(tmp_path / "eval_samples" / "iter_000004.jsonl")
    assert rows and set(rows[0]) == {"prompt", "response", "reward"}


# ---- a checkpoint before an error that leaves the learner intact -----------------------------

class RaisingReward(FakeReward):
    """The reward function raises on the ``at``-th batch it scores (0-based)."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def score(self, batch_ref):
        if len(self.calls) == self.at:
            raise RemoteCallError("reward scoring: reward failed: ZeroDivisionError", "error", ("reward", 0),
                                  "reward scoring")
        return super().score(batch_ref)


def test_checkpoints_are_on_by_default():
    assert CheckpointConfig().every > 0  # a lost learner group no longer restarts from iteration 0


def test_a_reward_that_raises_mid_run_leaves_a_checkpoint_of_the_last_completed_iteration(tmp_path):
    run = _run(tmp_path, scorer=RaisingReward(at=2), checkpoint={"every": 0})
    with pytest.raises(RemoteCallError, match="ZeroDivisionError"):
        run.iterate()
    # iterations 0 and 1 completed; the failed third was rolled back, the learner never saw it
    saved = ckpt.complete_checkpoints(str(tmp_path))
    assert [os.path.basename(p) for p in saved] == ["iter_000002"]
    assert ckpt.load_coordinator_state(saved[0])["iteration"] == 2 == run.coord.iteration
    assert len(run.roles.learners.train_calls) == 2
    again = _run(tmp_path)  # fixed, and resumed from it
    again.resume(ckpt.resolve_resume(str(tmp_path), again.cfg))
    assert again.coord.iteration == 2


def test_no_usable_sample_stops_with_a_checkpoint(tmp_path):
    run = _run(tmp_path, scorer=AllNaNReward(), ppo={"max_bad_iterations": 2}, checkpoint={"every": 0})
    with pytest.raises(NonFiniteError):
        run.iterate()
    assert [os.path.basename(p) for p in ckpt.complete_checkpoints(str(tmp_path))] == ["iter_000001"]


def test_a_learner_error_in_the_update_stops_without_a_checkpoint(tmp_path):
    class RaisingLearners(CheckpointingLearners):
        def train(self, update, iteration):
            if iteration == 2:
                raise RemoteCallError("PPO update: learner rank 1 failed", "error", ("learner", 1), "PPO update")
            return super().train(update, iteration)

    run = _run(tmp_path, learners=RaisingLearners(), checkpoint={"every": 0})
    with pytest.raises(RemoteCallError, match="learner rank 1 failed"):
        run.iterate()  # some ranks may have stepped: the learner state is not that of iteration 2
    assert run.roles.learners.saved == []


def test_a_failure_while_the_learner_group_restarts_stops_without_a_checkpoint(tmp_path):
    class FailingRestart(FakeRoles):
        def restart_learners(self) -> None:  # fresh learners, initial weights; then the sync group fails
            raise RemoteCallError("weight-sync group set-up: rollout engine 0 failed", "error", ("rollout", 0),
                                  "weight-sync group set-up")

    learners = CheckpointingLearners(fail_train_at=2)
    cfg = _config(ppo={"iterations": 4}, logging={"tensorboard": False, "progress_bar": False},
                  checkpoint={"every": 0})
    run = Run(cfg, str(tmp_path), Inputs(_prompts(), PAD, [EOS], CharTokenizer(), None), FailingRestart(learners),
              _coordinator(cfg, learners=learners), say=lambda line: None)
    with pytest.raises(RemoteCallError, match="rollout engine 0 failed"):
        run.iterate()
    assert learners.saved == []  # iteration 2's checkpoint would have held the initial model


# ---- resuming from an older checkpoint starts a new branch ------------------------------------

def _four_iterations_with_checkpoints(tmp_path) -> str:
    first = _run(tmp_path, checkpoint={"every": 1, "keep_last": 3})
    first.iterate()
    first.finish()
    assert [os.path.basename(p) for p in ckpt.complete_checkpoints(str(tmp_path))] == [
        "iter_000002", "iter_000003", "iter_000004"]
    return str(tmp_path / "checkpoints" / "iter_000002")


def test_recovery_after_resuming_from_an_older_checkpoint_stays_on_the_new_branch(tmp_path):
    older = _four_iterations_with_checkpoints(tmp_path)
    learners = CheckpointingLearners(fail_train_at=2)  # lost before the new branch saved anything
    again = _run(tmp_path, learners=learners, checkpoint={"every": 1, "keep_last": 3})
    again.resume(older)
    again.iterate()
    again.finish()
    # the restarted group reloads iteration 2, not the abandoned branch's iteration 4
    assert learners.loaded == [older, older]
    assert [r["iteration"] for r in _rows(tmp_path / "metrics.jsonl")] == [0, 1, 2, 3]
    assert os.path.isfile(tmp_path / "checkpoints" / "abandoned" / "after_iter_000002" / "iter_000004" / "COMPLETE")


def test_resume_of_the_run_directory_after_resuming_an_older_checkpoint_takes_the_new_branch(tmp_path):
    older = _four_iterations_with_checkpoints(tmp_path)
    again = _run(tmp_path)
    again.resume(older)  # and the driver is killed before the next checkpoint
    cfg = config_from_dict({})
    assert ckpt.resolve_resume(str(tmp_path), cfg) == older


# ---- the summary of a resumed run covers the whole run ----------------------------------------

def test_the_summary_after_a_resume_covers_every_iteration(tmp_path, capsys):
    first = _run(tmp_path, eval_every=2, checkpoint={"every": 2})
    first.iterate()
    first.finish()
    again = _run(tmp_path, eval_every=2, ppo={"iterations": 6})
    again.resume(str(tmp_path / "checkpoints" / "iter_000002"))
    again.iterate()
    summary = again.finish()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert summary["iterations"] == 6 and summary["resumed_at"] == 2 and summary["final_iteration"] == 6
    assert summary["seconds_per_iteration"] == pytest.approx(sum(r["time/iteration"] for r in rows) / 6)
    assert summary["eval"]["first"]["iteration"] == 0 and summary["eval"]["last"]["iteration"] == 6
    assert json.loads((tmp_path / "summary.json").read_text())["iterations"] == 6
    print_summary(summary)
    out = capsys.readouterr().out
    assert "done: 6 iterations (resumed at iteration 2)" in out and "after 0 iterations -> " in out


def test_the_roles_line_names_a_reference_actor_only_where_there_is_one():
    cfg = _config(learner={"num_ranks": 2, "micro_batch_size": 3, "zero_stage": 3}, rollout={
        "prompts_per_iteration": 4, "samples_per_prompt": 1, "max_new_tokens": 5, "num_engines": 2})
    assert roles_line(cfg, 3.0, False) == ("roles up in 3.0 s: 2 rollout engine(s), reference, reward, "
                                           "2 learner rank(s) (ZeRO-3)")
    lora = roles_line(cfg, 3.0, True)  # reference.from_learner: no reference actor exists
    assert lora == ("roles up in 3.0 s: 2 rollout engine(s), reward, 2 learner rank(s) "
                    "(ZeRO-3; also the reference, adapters off)")
    fsdp2 = _config(learner={"num_ranks": 2, "micro_batch_size": 3, "zero_stage": 3, "backend": "fsdp2"}, rollout={
        "prompts_per_iteration": 4, "samples_per_prompt": 1, "max_new_tokens": 5, "num_engines": 2})
    assert roles_line(fsdp2, 3.0, False).endswith("2 learner rank(s) (FSDP2, reshard after forward)")
