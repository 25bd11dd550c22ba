"""scripts/demo.sh's own flags (--one-stage, --lora), wherever they stand among the arguments.

The script runs for real in a copy of its repository layout whose ``scripts/bootstrap.sh`` does
nothing and whose ``.venv/bin/python`` only records its arguments; the recorded job command is then
parsed by the real entry point with ``--dry-run`` (nothing starts).
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray import launch, pipeline

REPO = Path(__file__).resolve().parents[2]

RECORDER = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_PYTHON_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
"""


def _executable(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _demo_argv(tmp_path: Path, *args: str) -> list[str]:
    """The arguments scripts/demo.sh hands to ``.venv/bin/python`` for ``scripts/demo.sh ARGS``."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(REPO / "scripts" / "demo.sh", root / "scripts" / "demo.sh")
    _executable(root / "scripts" / "bootstrap.sh", "#!/usr/bin/env bash\nexit 0\n")
    _executable(root / ".venv" / "bin" / "python", RECORDER)
    log = tmp_path / "python.log"
    result = subprocess.run(["bash", str(root / "scripts" / "demo.sh"), *args], capture_output=True, text=True,
                            env={**os.environ, "FAKE_PYTHON_LOG": str(log)}, timeout=60)
    assert result.returncode == 0, result.stderr
    (argv,) = [json.loads(line) for line in log.read_text().splitlines()]
    return argv


LORA_PIPELINE = ["-m", "rlhf_ray.pipeline", "--config", "configs/pipeline_cpu.yaml",
                 "--ppo.name", "pipeline_ppo_lora", "--ppo.model.lora.rank", "8", "--ppo.learner.lr", "0.001"]


@pytest.mark.parametrize("args", [("--lora", "--stages", "[ppo]"), ("--stages", "[ppo]", "--lora")],
                         ids=["lora-first", "lora-last"])
def test_lora_flag_anywhere_reaches_the_pipeline_as_its_overrides(tmp_path, args):
    assert _demo_argv(tmp_path, *args) == LORA_PIPELINE + ["--stages", "[ppo]"]


@pytest.mark.parametrize("args", [("--one-stage", "--ppo.iterations", "3", "--lora"),
                                  ("--ppo.iterations", "3", "--lora", "--one-stage"),
                                  ("--lora", "--ppo.iterations", "3", "--one-stage")])
def test_one_stage_lora_in_any_order(tmp_path, args):
    assert _demo_argv(tmp_path, *args) == ["-m", "rlhf_ray.launch", "--config", "configs/demo_lora_cpu.yaml",
                                           "--ppo.iterations", "3"]


def test_plain_and_one_stage_pass_every_other_argument_in_order(tmp_path):
    assert _demo_argv(tmp_path / "a", "--stages", "[ppo]", "--ppo.ppo.iterations", "5") == \
        ["-m", "rlhf_ray.pipeline", "--config", "configs/pipeline_cpu.yaml", "--stages", "[ppo]",
         "--ppo.ppo.iterations", "5"]
    assert _demo_argv(tmp_path / "b", "--ppo.iterations", "4", "--one-stage") == \
        ["-m", "rlhf_ray.launch", "--config", "configs/demo_cpu.yaml", "--ppo.iterations", "4"]


def test_the_recorded_lora_command_passes_the_pipelines_own_validation(tmp_path, monkeypatch, capsys):
    argv = _demo_argv(tmp_path, "--stages", "[ppo]", "--lora")
    monkeypatch.chdir(REPO)
    assert pipeline.main(argv[2:] + ["--dry-run"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["stages"] == ["ppo"]
    assert cfg["ppo"]["name"] == "pipeline_ppo_lora" and cfg["ppo"]["model"]["lora"]["rank"] == 8


def test_the_recorded_one_stage_lora_command_passes_the_launchers_validation(tmp_path, monkeypatch):
    argv = _demo_argv(tmp_path, "--ppo.iterations", "3", "--lora", "--one-stage")
    monkeypatch.chdir(REPO)
    _args, cfg = launch.parse_args(argv[2:])
    assert cfg.model.lora.rank > 0 and cfg.ppo.iterations == 3
