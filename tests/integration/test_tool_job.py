"""The tool-use main job (``scripts/demo.sh --tools``, configs/tools_cpu.yaml) end to end on a local
Ray cluster: demo data -> SFT on noisy calculator episodes -> PPO on episodes with the calculator
environment, the verifiable reward, and the held-out check before -> after.

The SFT stage is the config's own (its numbers are checked offline by
``benchmarks/tool_policy_check.py``: held-out accuracy ~0.5 sampled, tool-call rate ~0.8); PPO is
cut to PPO_ITERATIONS (20; the full job's held-out accuracy was 0.484 -> 0.906 at iteration 25).
"""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.integration

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
PPO_ITERATIONS = 20


def test_tool_job_sft_then_ppo_on_calculator_episodes(ray_cluster, tmp_path):
    from rlhf_ray.config import load_config
    from rlhf_ray.envs.calculator import CalcError, evaluate, find_calls
    from rlhf_ray.pipeline import run_pipeline
    from rlhf_ray.supervised.config import PipelineConfig, validate_pipeline

    d, sft = tmp_path / "data", str(tmp_path / "sft")
    overrides = {
        "demo_data_dir": str(d),
        "sft.model.path": str(tmp_path / "tiny-llama"), "sft.data.train_path": str(d / "sft.jsonl"),
        "sft.train.output_dir": sft,
        "ppo.model.path": sft, "ppo.data.prompts": str(d / "prompts.jsonl"),
        "ppo.eval.prompts": str(d / "eval_prompts.jsonl"), "ppo.eval.every": str(PPO_ITERATIONS),
        "ppo.ppo.iterations": str(PPO_ITERATIONS), "ppo.checkpoint.save_on_stop": "false",
        "ppo.logging.run_dir": str(tmp_path / "ppo"), "ppo.logging.progress_bar": "false",
        "ppo.logging.tensorboard": "false",
    }
    cfg = load_config(os.path.join(CONFIGS, "tools_cpu.yaml"), overrides, cls=PipelineConfig,
                      validator=validate_pipeline)
    summary = run_pipeline(cfg)
    assert "rm" not in summary and summary["ppo"]["completed"] and summary["ppo"]["iterations"] == PPO_ITERATIONS
    ba = summary["before_after"]
    assert (ba["first_iteration"], ba["last_iteration"]) == (0, PPO_ITERATIONS)
    gold_before, gold_after = ba["gold"]
    calls_before, calls_after = ba["tool_call_rate"]
    # The SFT policy (sampled) has learned the format but is noisy (offline check: ~0.5 right, ~0.8 calls).
    assert 0.3 < gold_before < 0.7 and calls_before > 0.6, ba
    assert gold_after > gold_before + 0.1, ba  # the direction, on this seed
    assert calls_after >= calls_before - 0.05, ba
    assert ba["reward"] == pytest.approx(ba["gold"])  # the reward is the gold check

    rows = [json.loads(line) for line in open(os.path.join(summary["ppo"]["run_dir"], "eval_samples",
                                                           f"iter_{PPO_ITERATIONS:06d}.jsonl"))]
    called = [r for r in rows if find_calls(r["response"])]
    assert len(called) > len(rows) / 2, rows[:3]
    # Each call is followed by the calculator's answer to it, marked as an observation ([[ ]]: context,
    # not trained on): it was appended after the turn that the stop string ended (the last call wins).
    for r in called:
        head, tail = r["response"].split("</calc>", 1)
        try:
            expected = f"[[ {evaluate(find_calls(head + '</calc>')[-1])}.]]"
        except CalcError:
            expected = "[[ error.]]"
        assert tail.startswith(expected), r
