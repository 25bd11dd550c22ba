"""The full system on a local Ray cluster: vLLM CPU engine, reference, reward function and
DeepSpeed learner ranks, for a few PPO iterations, under ZeRO-2 and ZeRO-3 and both weight-sync
transports; one step off-policy; held-out evaluation, with the reward served over HTTP."""

from __future__ import annotations

import json
import os

import pytest

from tests.integration.conftest import LR_SCHEDULE, LR_SCHEDULE_VALUES, check_ppo_rows, small_config

pytestmark = pytest.mark.integration


def _read_metrics_file(path: str) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh]


def _read_metrics(run_dir: str) -> list[dict]:
    return _read_metrics_file(os.path.join(run_dir, "metrics.jsonl"))


def test_the_demo_config_end_to_end(ppo_twin_run):
    """The demo's own set-up: configs/demo_cpu.yaml's CPU twin (tests/twins.py), run once per session
    and shared with tests/integration/test_config_twins.py, which checks it as a config. ZeRO-2,
    the collective sync in 16 MiB buckets, a shared-body critic, and the torch.compile'd engine
    (enforce_eager false): the synced weights must reach the compiled graph, not only the module's
    parameters."""
    cfg, summary, run_dir = ppo_twin_run("demo_cpu.yaml")
    assert (cfg.learner.zero_stage, cfg.sync.transport, cfg.sync.bucket_mb, cfg.model.separate_critic,
            cfg.rollout.vllm.enforce_eager, cfg.sync.check_logprobs_every) == (2, "collective", 16.0, False, False, 1)
    assert summary["completed"] and summary["iterations"] == 3
    rows = _read_metrics(run_dir)
    check_ppo_rows(rows, cfg.rollout.prompts_per_iteration * cfg.rollout.samples_per_prompt,
                   evaluated=(cfg.eval.every,))  # the evaluation after iteration 1 syncs its update
    # The demo's constant learning rate (a warm-up and a decay: the ZeRO-3 runs, tests/unit/test_lr_schedule.py).
    assert [r["lr"] for r in rows] == pytest.approx([cfg.learner.lr] * 3, rel=1e-6)
    assert os.listdir(os.path.join(run_dir, "tensorboard"))
    assert summary["reward_start"] == pytest.approx(sum(r["reward_mean"] for r in rows) / 3)


# The ZeRO-3 case with the collective sync in 0.02 MiB buckets runs with 3-turn episodes:
# tests/integration/test_episodes_system.py. The demo's own set-up (ZeRO-2, 16 MiB buckets, the
# compiled engine) is the test above.
def test_zero3_object_store_and_a_separate_critic_end_to_end(ray_cluster, tiny_llama, tmp_path):
    from rlhf_ray.coordinator.run import run

    cfg = small_config(tiny_llama, **{"learner.zero_stage": 3, "sync.transport": "object_store",
                                      "model.separate_critic": True, "sync.bucket_mb": 16.0, **LR_SCHEDULE})
    summary = run(cfg, str(tmp_path / "run"))
    assert summary["completed"] and summary["iterations"] == 3
    rows = _read_metrics(str(tmp_path / "run"))
    check_ppo_rows(rows, 16)
    assert [r["lr"] for r in rows] == pytest.approx(LR_SCHEDULE_VALUES, rel=1e-5)
    assert os.listdir(tmp_path / "run" / "tensorboard")
    assert summary["reward_start"] == pytest.approx(sum(r["reward_mean"] for r in rows) / 3)


@pytest.fixture(scope="module")
def fixed_policy_run(ray_cluster, tiny_llama, tmp_path_factory) -> tuple[dict, str, list[int]]:
    """One run for the two tests below: the reward served over HTTP (rlhf_ray.reward_server with the
    demo's function, scored in the reward actor through reward.kind http), eval.every 1 on 8
    held-out prompts, and a learning rate far below float32 resolution, which keeps the weights
    fixed. Returns the summary, the run directory and the size of each request the server got."""
    import threading

    from rlhf_ray.coordinator.run import run
    from rlhf_ray.reward_server import make_server
    from rlhf_ray.rewards import digit_fraction

    requests: list[int] = []

    def served(prompts, responses):
        requests.append(len(responses))
        return digit_fraction(prompts, responses)

    srv = make_server(served, "127.0.0.1", 0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    run_dir = str(tmp_path_factory.mktemp("fixed") / "run")
    try:
        cfg = small_config(tiny_llama, **{"reward.kind": "http", "eval.every": 1, "eval.holdout": 8,
                                          "learner.lr": 1e-12,
                                          "reward.url": f"http://127.0.0.1:{srv.server_address[1]}/score"})
        summary = run(cfg, run_dir)
    finally:
        srv.shutdown()
        srv.server_close()
    return summary, run_dir, requests


def test_ppo_with_a_reward_endpoint(fixed_policy_run):
    summary, run_dir, requests = fixed_policy_run
    assert summary["completed"] and 0.0 <= summary["reward_start"] <= 1.0
    # every iteration's 16 samples were scored by the endpoint (beside the probe and the evaluations)
    assert requests.count(16) >= 3, requests


def test_held_out_evaluation_is_greedy_and_logged(fixed_policy_run):
    """eval.every 1 on 8 held-out prompts: evaluations before the first update, after each one and
    at the end. With the weights fixed, greedy decoding must give the same evaluation every time
    (sampling at temperature 1 would not)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary, run_dir, _ = fixed_policy_run
    assert summary["completed"]
    evals = _read_metrics_file(os.path.join(run_dir, "eval.jsonl"))
    assert [e["iteration"] for e in evals] == [0, 1, 2, 3]
    assert all(e["eval/samples"] == 8 and e["eval/nonfinite_scores"] == 0 for e in evals)
    keys = ("eval/reward_mean", "eval/response_length", "eval/truncation_rate")
    assert all([e[k] for k in keys] == [evals[0][k] for k in keys] for e in evals), evals
    assert summary["eval"]["first"]["iteration"] == 0 and summary["eval"]["last"]["iteration"] == 3
    assert summary["eval"]["prompts"] == 8
    tags = set()
    for name in os.listdir(os.path.join(run_dir, "tensorboard")):
        acc = EventAccumulator(os.path.join(run_dir, "tensorboard", name))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"eval/reward_mean", "reward_mean"} <= tags
