"""Checkpoints are complete and atomic, resume continues with the same next batch and the
saved policy (re-synced to the engines), export yields a standard HF model, and SIGTERM stops a
launched run cleanly with a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.integration.conftest import WARMUP_RUN, small_config

pytestmark = pytest.mark.integration
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_checkpoint_resume_and_export(warmup_run, tiny_llama, tmp_path):
    """The run of tests/integration/conftest.py's ``warmup_run`` (4 iterations, a checkpoint after
    each, the last 2 kept, 16 prompts; a critic warm-up first, checked by test_critic_warmup_system.py),
    resumed to 6 iterations."""
    from transformers import AutoModelForCausalLM

    from rlhf_ray.checkpoint_files import complete_checkpoints
    from rlhf_ray.coordinator.run import run
    from rlhf_ray.data.prompts import PromptSampler
    from rlhf_ray.export import export

    first, run_dir, _ = warmup_run
    assert first["completed"] and first["final_iteration"] == 4
    ckpts = complete_checkpoints(run_dir)
    assert [os.path.basename(c) for c in ckpts] == ["iter_000003", "iter_000004"]  # keep_last 2
    assert not [d for d in os.listdir(os.path.join(run_dir, "checkpoints")) if d.endswith(".tmp")]
    assert os.path.isfile(os.path.join(run_dir, "curves.png"))

    # A half-written checkpoint (crash while saving) is ignored by resume.
    os.makedirs(os.path.join(run_dir, "checkpoints", "iter_000009.tmp", "learner"))
    # A crash after iteration 4 was logged but before it was checkpointed: resume redoes it, and
    # its stale row must not stay beside the new one.
    with open(os.path.join(run_dir, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps({"iteration": 4, "stale": True}) + "\n")

    resumed = run(small_config(tiny_llama, **{**WARMUP_RUN, "ppo.iterations": 6}), str(tmp_path / "unused"),
                  resume=run_dir)
    # The summary covers the whole run, the iterations before the checkpoint included.
    assert resumed["completed"] and resumed["final_iteration"] == 6 and resumed["iterations"] == 6
    assert resumed["resumed_at"] == 4
    rows = _metrics(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert not any(r.get("stale") for r in rows)
    # The resumed run drew exactly the batches an uninterrupted run would have (16 prompts,
    # 4 per iteration: iteration 4 starts the second epoch).
    sampler = PromptSampler(16, seed=0)
    expected = [sampler.next(4) for _ in range(6)]
    assert [r["prompt_indices"] for r in rows] == expected
    # The engines were re-synced with the checkpoint's policy (not model.path): the policy is
    # away from the reference, and vLLM agrees with the learner on it.
    assert rows[4]["kl_k2_mean"] > 1e-6
    assert rows[4]["logprob_mismatch_max"] < 2e-3

    out = export(run_dir, str(tmp_path / "exported"))
    assert not os.path.exists(os.path.join(out, "value_head.safetensors"))
    model = AutoModelForCausalLM.from_pretrained(out)
    saved = AutoModelForCausalLM.from_pretrained(os.path.join(complete_checkpoints(run_dir)[-1], "policy"))
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    name = "model.layers.0.mlp.up_proj.weight"
    assert (model.state_dict()[name] == saved.state_dict()[name]).all()
    assert not (model.state_dict()[name] == base.state_dict()[name]).all()


def test_sigterm_stops_cleanly_with_a_checkpoint(tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "rlhf_ray.launch", "--config", "configs/demo_cpu.yaml", "--model.path", tiny_llama,
           "--model.build_tiny", "none", "--ppo.iterations", "400", "--logging.run_dir", str(run_dir),
           "--rollout.prompts_per_iteration", "4",
           "--rollout.samples_per_prompt", "4", "--learner.micro_batch_size", "4", "--logging.tensorboard", "false",
           "--rollout.vllm.enforce_eager", "true"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    # Another driver reaches the run's actors through the namespace the run recorded and printed:
    # started now (its Python and Ray start-up take seconds), answered after the checks below.
    where = json.loads((run_dir / "ray.json").read_text())
    probe = ("import ray, sys; ray.init(address=sys.argv[1], namespace=sys.argv[2], log_to_driver=False); "
             "print('PING', ray.get(ray.get_actor('rollout-0').ping.remote(), timeout=60)['pid'])")
    other = subprocess.Popen([sys.executable, "-c", probe, where["gcs_address"], where["namespace"]], cwd=ROOT,
                             env={**env, "RAY_AUTH_MODE": "token"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    # While it runs, the node's Prometheus endpoint (what the dashboard's metrics view reads)
    # serves the coordinator's custom metrics.
    endpoint = where["metrics"]
    assert endpoint and endpoint.startswith("http://")
    found, deadline = [], time.time() + 60
    while True:
        text = urllib.request.urlopen(endpoint, timeout=10).read().decode()
        found = [line for line in text.splitlines() if line.startswith("ray_rlhf_reward_mean")]
        if found or time.time() > deadline:
            break
        time.sleep(1)
    assert found, "rlhf_reward_mean not exported"
    # The dashboard lists every role's actor by name (token auth is on by default in Ray 2.60).
    dashboard = json.loads((run_dir / "ray.json").read_text())["dashboard"]
    assert dashboard.startswith("http://127.0.0.1:")  # the dashboard listens on loopback only
    token = open(os.path.expanduser("~/.ray/auth_token")).read().strip()
    req = urllib.request.Request(f"{dashboard}/api/v0/actors?limit=100", headers={"Authorization": f"Bearer {token}"})
    actors = json.loads(urllib.request.urlopen(req, timeout=20).read())["data"]["result"]["result"]
    alive = {a["name"] for a in actors if a["state"] == "ALIVE"}
    assert {"rollout-0", "reference-0", "reward-0", "learner-0", "learner-1"} <= alive, alive
    try:
        other_out, other_err = other.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        other.kill()
        other_out, other_err = other.communicate()
    assert "PING" in other_out, other_out[-2000:] + other_err[-2000:]
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out[-3000:]
    # What it printed is true and findable: names as Prometheus exports them, the endpoint and the
    # namespace as recorded; no progress-bar frames in a log (stdout is a pipe here).
    assert f"Prometheus metrics (ray_rlhf_*): {endpoint}" in out and f"'{where['namespace']}'" in out
    assert "\r" not in out and "it 0 " in out and "[1/400 " in out
    assert "Setting accelerator to CPU" not in out and (run_dir / "library_notices.log").exists()
    startup = json.loads((run_dir / "startup.json").read_text())
    assert f"start-up {startup['total_s']:.1f} s (imports" in out and startup["roles_s"] > 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] and not summary["completed"]
    stop_at = summary["final_iteration"]
    assert 2 <= stop_at < 400
    assert (run_dir / "checkpoints" / f"iter_{stop_at:06d}" / "COMPLETE").exists()
