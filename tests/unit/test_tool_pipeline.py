"""The tool-use main job's wiring: ``scripts/demo.sh --tools``, the pipeline without a reward-model
stage, and what it reports (held-out accuracy and tool-call rate before -> after).

Nothing starts: the demo script runs in a copy of its layout with a ``.venv/bin/python`` that records
its arguments (as ``tests/unit/test_demo_script.py`` does); the report is built from evaluation
files written here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from rlhf_ray import pipeline
from rlhf_ray.config import ConfigError
from rlhf_ray.coordinator.gold import eval_samples_path
from rlhf_ray.supervised.config import PipelineConfig, validate_pipeline
from tests.unit.test_demo_script import REPO, RECORDER, _executable

TOOLS_PIPELINE = ["-m", "rlhf_ray.pipeline", "--config", "configs/tools_cpu.yaml"]


def _run_demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    (root / "scripts" / "demo.sh").write_text((REPO / "scripts" / "demo.sh").read_text())
    _executable(root / "scripts" / "bootstrap.sh", "#!/usr/bin/env bash\nexit 0\n")
    _executable(root / ".venv" / "bin" / "python", RECORDER)
    log = tmp_path / "python.log"
    result = subprocess.run(["bash", str(root / "scripts" / "demo.sh"), *args], capture_output=True, text=True,
                            env={**os.environ, "FAKE_PYTHON_LOG": str(log)}, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return result, calls


@pytest.mark.parametrize("args", [("--tools", "--ppo.ppo.iterations", "5"), ("--ppo.ppo.iterations", "5", "--tools")])
def test_demo_tools_runs_the_tool_pipeline_with_the_other_arguments(tmp_path, args):
    result, calls = _run_demo(tmp_path, *args)
    assert result.returncode == 0, result.stderr
    assert calls == [TOOLS_PIPELINE + ["--ppo.ppo.iterations", "5"]]


@pytest.mark.parametrize("other", ["--one-stage", "--lora"])
def test_demo_tools_refuses_the_other_jobs_flags(tmp_path, other):
    result, calls = _run_demo(tmp_path, "--tools", other)
    assert result.returncode == 2 and calls == []
    assert "--tools is its own job" in result.stderr and "drop them" in result.stderr


def _tools_like(stages: tuple[str, ...] = ("sft", "ppo"), **reward) -> PipelineConfig:
    base = PipelineConfig(stages=stages, demo_task="tools")
    ppo = dataclasses.replace(base.ppo, model=dataclasses.replace(base.ppo.model, path=base.sft.train.output_dir),
                              reward=dataclasses.replace(base.ppo.reward, **reward))
    return dataclasses.replace(base, ppo=ppo)


def test_a_pipeline_without_an_rm_stage_may_score_with_a_function():
    validate_pipeline(_tools_like(kind="function", function="rlhf_ray.rewards:tool_answer_correct"))


def test_an_rm_stage_whose_model_ppo_does_not_use_is_refused():
    with pytest.raises(ConfigError) as err:
        validate_pipeline(_tools_like(("sft", "rm", "ppo"), kind="function"))
    assert "or leave rm out of --stages to score with --ppo.reward.kind function" in str(err.value)


def test_a_reward_model_must_still_be_the_rm_output_without_an_rm_stage():
    with pytest.raises(ConfigError) as err:
        validate_pipeline(_tools_like(("ppo",), kind="model", model_path="elsewhere"))
    assert "set --ppo.reward.model_path 'artifacts/rm'" in str(err.value)


def test_the_tools_config_passes_the_pipelines_validation(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert pipeline.main(TOOLS_PIPELINE[2:] + ["--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["stages"] == ["sft", "ppo"] and cfg["demo_task"] == "tools"
    assert cfg["ppo"]["rollout"]["env"] == "rlhf_ray.envs.calculator:CalculatorEnv"
    assert cfg["ppo"]["reward"]["function"] == cfg["ppo"]["reward"]["gold"] == "rlhf_ray.rewards:tool_answer_correct"


def _write_eval(run_dir: Path, iteration: int, responses: list[str], gold: list[float]) -> None:
    path = Path(eval_samples_path(str(run_dir), iteration))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"Q: what is {10 + i} * 11? A:", "response": r, "reward": g,
                                        "gold": g}) + "\n" for i, (r, g) in enumerate(zip(responses, gold))))


def test_before_after_counts_the_episodes_that_call_the_tool(tmp_path):
    before = [" answer 12", " <calc> 11 * 11</calc> 121. answer 121", " <calc> 12 * 11", " answer 5"]
    after = [" <calc> 10 * 11</calc> 110. answer 110", " <calc> 11 * 11</calc> 121. answer 121",
             " <calc> 12 * 11</calc> 132. answer 132", " answer 143"]
    _write_eval(tmp_path, 0, before, [0.0, 1.0, 0.0, 0.0])
    _write_eval(tmp_path, 100, after, [1.0, 1.0, 1.0, 1.0])
    ppo = {"run_dir": str(tmp_path), "reward_kind": "function", "kl_end": 0.1,
           "eval": {"first": {"iteration": 0, "eval/reward_mean": 0.25, "eval/gold_mean": 0.25, "eval/samples": 4},
                    "last": {"iteration": 100, "eval/reward_mean": 1.0, "eval/gold_mean": 1.0, "eval/samples": 4},
                    "temperature": 1.0}}
    ba = pipeline.before_after(ppo, shown=2, has_tool_call=pipeline.tool_call_check("tools"))
    assert ba["tool_call_rate"] == [0.25, 0.75]  # an unclosed <calc> is no call
    assert len(ba["rows"]) == 2
    assert pipeline.verdict(ba) == ("VERDICT: held-out gold accuracy 0.250 -> 1.000 (4 answers, sampled at "
                                    "temperature 1); held-out tool-call rate 0.250 -> 0.750; held-out reward "
                                    "0.250 -> 1.000; final KL 0.100")
    assert "tool_call_rate" not in pipeline.before_after(ppo, shown=2)  # a task without a tool
    assert pipeline.tool_call_check("compare") is None


def test_the_ppo_line_names_the_reward_it_used():
    x = {"reward_start": 0.5, "reward_end": 0.9, "kl_start": 0.0, "kl_end": 0.1, "iterations": 100, "run_dir": "r"}
    assert pipeline.stage_line("ppo", {**x, "reward_kind": "function"}).startswith("PPO: reward 0.500 -> 0.900")
    assert pipeline.stage_line("ppo", x).startswith("PPO: RM reward 0.500 -> 0.900")
