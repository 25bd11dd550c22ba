"""The run's lifecycle (``rlhf_ray.coordinator.run.Run``) over the loop tests' in-process fakes:
iterate, evaluate, checkpoint, recover, resume, finish. No Ray."""

from __future__ import annotations

import json
import os

import pytest
import torch

from rlhf_ray.coordinator.pending import Done, RemoteCallError
from rlhf_ray.coordinator.preflight import Inputs
from rlhf_ray.coordinator.run import Run
from tests.unit.test_coordinator import EOS, PAD, FakeLearners, _config, _coordinator, _prompts


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

    def shutdown(self) -> None:
        self.shut = True


def _run(tmp_path, learners=None, eval_every: int = 0, **cfg_sections) -> Run:
    cfg = _config(ppo={"iterations": 4}, logging={"tensorboard": False, "progress_bar": False, "log_every": 2},
                  eval={"every": eval_every}, **cfg_sections)
    learners = learners or CheckpointingLearners()
    coord = _coordinator(cfg, learners=learners, eval_prompts=_prompts(2) if eval_every else None)
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
