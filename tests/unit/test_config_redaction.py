"""Secrets in URLs of the config (``reward.url``) are masked wherever the config is saved or
printed: config.json, a checkpoint's coordinator.json, the launchers' --dry-run; and resuming
never reads the masked copy back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_ray.config import config_to_dict, load_config, redact_url, redacted
from rlhf_ray.coordinator.checkpoint import load_coordinator_state, save_checkpoint
from rlhf_ray.coordinator.run import write_config
from rlhf_ray.runtime.pending import Done

ROOT = Path(__file__).resolve().parents[2]
SECRET_URL = "https://u:hunter2@h/score?token=abc"


@pytest.mark.parametrize("url, expected", [
    ("https://u:hunter2@h/score?token=abc", "https://u:***@h/score?token=***"),
    ("http://user:p%40ss@h:8000/score", "http://user:***@h:8000/score"),
    ("https://ghp_abc123@h/score", "https://***@h/score"),  # a lone userinfo is often the token itself
    ("http://h/s?a=1&API_KEY=z&b=%20x", "http://h/s?a=1&API_KEY=***&b=%20x"),  # the rest kept byte for byte
    ("http://h/s?access_token=t&Password=p&passwd=q&client_secret=s&auth=a&X-Amz-Signature=g&X-Amz-Credential=c",
     "http://h/s?access_token=***&Password=***&passwd=***&client_secret=***&auth=***&X-Amz-Signature=***"
     "&X-Amz-Credential=***"),
    ("http://h/s?api%5Fkey=z", "http://h/s?api%5Fkey=***"),  # names are matched percent-decoded
    ("http://h/cb#access_token=t&state=1", "http://h/cb#access_token=***&state=1"),
    ("http://[::1]:8000/score?key=k", "http://[::1]:8000/score?key=***"),
])
def test_redact_url_hand_examples(url, expected):
    assert redact_url(url) == expected


@pytest.mark.parametrize("text", [
    "http://127.0.0.1:8000/score", "http://h/s?page=2&sort=asc", "artifacts/tiny-llama", "builtin:digits",
    "rlhf_ray.rewards:digit_fraction", "runs/{name}-{time}", "", "http://[::1", "user:pass@host",
])
def test_what_is_no_secret_is_unchanged(text):
    assert redact_url(text) == text


def test_redacted_walks_the_whole_tree_and_leaves_its_input_alone():
    tree = {"a": {"b": [SECRET_URL, 1, None, ("x", "http://k@h/")]}, "n": 2.5, "flag": True, "s": "plain"}
    before = json.dumps(tree)
    assert redacted(tree) == {"a": {"b": ["https://u:***@h/score?token=***", 1, None, ["x", "http://***@h/"]]},
                              "n": 2.5, "flag": True, "s": "plain"}
    assert json.dumps(tree) == before


def http_config():
    return load_config(None, {"reward.kind": "http", "reward.url": SECRET_URL, "reward.function": "none"})


def test_config_json_holds_no_secret(tmp_path):
    cfg = http_config()
    text = Path(write_config(cfg, str(tmp_path))).read_text()
    assert "hunter2" not in text and "abc" not in text
    saved = json.loads(text)
    assert saved["reward"]["url"] == "https://u:***@h/score?token=***"
    assert saved == redacted(config_to_dict(cfg))  # everything else as it was
    assert cfg.reward.url == SECRET_URL  # the run's own config is untouched


class SavingLearners:
    def save_checkpoint(self, path, tokenizer_path):
        os.makedirs(os.path.join(path, "learner"))
        return Done([True])


def test_checkpoint_config_copy_holds_no_secret_and_resume_does_not_need_it(tmp_path):
    state = {"iteration": 3, "kl": {"coef": 0.05}}
    path = save_checkpoint(str(tmp_path), 3, state, http_config(), SavingLearners(), None)
    text = (Path(path) / "coordinator.json").read_text()
    assert "hunter2" not in text and "abc" not in text
    assert json.loads(text)["config"]["reward"]["url"] == "https://u:***@h/score?token=***"
    assert load_coordinator_state(path) == state  # what resume reads: the coordinator's state only


def dry_run(module: str, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-m", module, *args, "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout + done.stderr


def test_launch_dry_run_prints_no_secret():
    out = dry_run("rlhf_ray.launch", "--config", "configs/demo_cpu.yaml", "--reward.kind", "http",
                  "--reward.url", SECRET_URL)
    assert "hunter2" not in out and "abc" not in out
    assert '"url": "https://u:***@h/score?token=***"' in out


def test_pipeline_and_sft_dry_runs_print_no_secret():
    out = dry_run("rlhf_ray.pipeline", "--config", "configs/pipeline_cpu.yaml", "--ppo.reward.url", SECRET_URL)
    assert "hunter2" not in out and "abc" not in out and "https://u:***@h/score?token=***" in out
    out = dry_run("rlhf_ray.train_sft", "--config", "configs/sft_cpu.yaml", "--model.path", SECRET_URL)
    assert "hunter2" not in out and "abc" not in out and "https://u:***@h/score?token=***" in out
